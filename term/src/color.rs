//! Whether output is coloured: never when `NO_COLOR` is set to anything (<https://no-color.org>),
//! always when `CLICOLOR_FORCE` is set to anything but `0`, otherwise only when standard error is
//! a terminal that is not `TERM=dumb`. A coordinator hands its decision to the workers it spawns
//! (`child_env`), because it forwards their standard error to its own.

use std::io::IsTerminal;

/// Whether this process colours what it writes to standard error.
pub fn enabled() -> bool {
    let var = |name| std::env::var(name).ok();
    decide(
        var("NO_COLOR").as_deref(),
        var("CLICOLOR_FORCE").as_deref(),
        std::io::stderr().is_terminal() && var("TERM").as_deref() != Some("dumb"),
    )
}

/// The variable a spawned process gets so that it colours exactly when this one does.
pub fn child_env() -> (&'static str, &'static str) {
    if enabled() {
        ("CLICOLOR_FORCE", "1")
    } else {
        ("NO_COLOR", "1")
    }
}

fn decide(no_color: Option<&str>, force: Option<&str>, terminal: bool) -> bool {
    if no_color.is_some_and(|v| !v.is_empty()) {
        return false;
    }
    if force.is_some_and(|v| !v.is_empty() && v != "0") {
        return true;
    }
    terminal
}

#[cfg(test)]
mod tests {
    use super::decide;

    #[test]
    fn colour_follows_the_terminal_unless_no_color_or_clicolor_force_says_otherwise() {
        assert!(decide(None, None, true));
        assert!(!decide(None, None, false));
        assert!(!decide(Some("1"), None, true), "NO_COLOR wins");
        assert!(
            !decide(Some("1"), Some("1"), true),
            "NO_COLOR wins over a force"
        );
        assert!(decide(Some(""), None, true), "an empty NO_COLOR is unset");
        assert!(
            decide(None, Some("1"), false),
            "CLICOLOR_FORCE colours a pipe"
        );
        assert!(!decide(None, Some("0"), false));
    }
}
