//! `twtrace compare BEFORE AFTER`: the effect of a change.

use twtrace::{
    cli::CompareArgs,
    compare,
    filter::Filters,
    output::report_text,
    report::{self, Window},
};

use super::report::load;

pub fn run(args: &CompareArgs) -> anyhow::Result<()> {
    let before = report::build(
        &load(std::slice::from_ref(&args.before))?,
        &Filters::default(),
        Window::default(),
    );
    let after = report::build(
        &load(std::slice::from_ref(&args.after))?,
        &Filters::default(),
        Window::default(),
    );
    let c = compare::compare(&before, &after);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&c)?);
    } else {
        print!("{}", report_text::comparison(&c));
    }
    Ok(())
}
