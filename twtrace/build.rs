//! Builds the kernel programs (twtrace-ebpf) with bpf-linker and the nightly pinned in
//! twtrace-ebpf/rust-toolchain.toml (aya-build runs `rustup run CHANNEL cargo build`, so the
//! pin applies to that crate alone), and embeds the object in the binary.
use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("MetadataCommand::exec")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "twtrace-ebpf")
        .ok_or_else(|| anyhow!("twtrace-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    let package = aya_build::Package {
        name: ebpf.name.as_str(),
        root_dir: root_dir.as_str(),
        ..Default::default()
    };
    let pin = std::path::Path::new(root_dir.as_str()).join("rust-toolchain.toml");
    println!("cargo:rerun-if-changed={}", pin.display());
    let channel = pinned_channel(&pin)?;
    aya_build::build_ebpf([package], Toolchain::Custom(&channel))
}

/// `toolchain.channel` of a rust-toolchain.toml.
fn pinned_channel(path: &std::path::Path) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let doc: toml_edit::DocumentMut = text
        .parse()
        .with_context(|| format!("parsing {}", path.display()))?;
    doc["toolchain"]["channel"]
        .as_str()
        .map(String::from)
        .ok_or_else(|| anyhow!("{} has no toolchain.channel", path.display()))
}
