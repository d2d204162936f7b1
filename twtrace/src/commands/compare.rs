//! `twtrace compare BEFORE AFTER`: the effect of a change.

use twtrace::{cli::CompareArgs, compare, filter::Filters, output::report_text, report::Window};

use super::report::{build, open};

pub fn run(args: &CompareArgs) -> anyhow::Result<()> {
    let report_of = |file: &std::path::PathBuf| {
        build(
            &mut open(std::slice::from_ref(file))?,
            &Filters::default(),
            Window::default(),
        )
    };
    let before = report_of(&args.before)?;
    let after = report_of(&args.after)?;
    let c = compare::compare(&before, &after);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&c)?);
    } else {
        print!("{}", report_text::comparison(&c));
    }
    Ok(())
}
