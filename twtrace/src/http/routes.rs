//! What the metrics server answers: `/metrics` (the tracer's last exposition), `/`, and the
//! errors (401, 503, 404, 405).

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{self, HeaderValue},
};

use super::{
    auth::{BasicAuth, Verdict},
    snapshot::Reader,
};

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The answer to one request: auth first (when configured), then GET or HEAD of `/metrics`
/// or `/`.
pub async fn respond(
    req: Request<Incoming>,
    auth: &Option<BasicAuth>,
    reader: &Reader,
) -> Response<Full<Bytes>> {
    if let Some(auth) = auth {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        match auth.check(given).await {
            Verdict::Allowed => {}
            Verdict::Denied => {
                let mut r = text(StatusCode::UNAUTHORIZED, "unauthorized\n");
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"twtrace\", charset=\"UTF-8\""),
                );
                return r;
            }
            Verdict::Busy => {
                let mut r = text(StatusCode::SERVICE_UNAVAILABLE, "busy checking passwords\n");
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
                return r;
            }
        }
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/metrics" => {
            let mut r = text(StatusCode::OK, reader.latest().await);
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        "/" => text(StatusCode::OK, "twtrace: TIME_WAIT metrics at /metrics\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}
