//! What a key does in the live view, apart from the terminal so tests can press keys. Esc
//! closes what is open (the filter input, the help) before it quits: at 3 a.m. one Esc too
//! many must not end the view.

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use super::model::ViewState;

/// What the loop must do after a key.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Redraw (the key changed the view, or did nothing).
    Redraw,
    /// Move to the next network namespace (needs the aggregator).
    NextNetns,
    Quit,
}

/// Applies `key` to the view and to the filter being typed (`input`, `Some` while open).
pub fn on_key(v: &mut ViewState, input: &mut Option<String>, key: KeyEvent) -> Action {
    if key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL) {
        return Action::Quit;
    }
    if let Some(text) = input.as_mut() {
        match key.code {
            KeyCode::Enter => v.filter = input.take().unwrap_or_default(),
            KeyCode::Esc => {
                *input = None;
                v.filter.clear();
            }
            KeyCode::Backspace => {
                text.pop();
            }
            KeyCode::Char(c) => text.push(c),
            _ => {}
        }
        return Action::Redraw;
    }
    match key.code {
        KeyCode::Esc if v.help => v.help = false,
        KeyCode::Char('q') | KeyCode::Esc => return Action::Quit,
        KeyCode::Tab => v.switch_table(),
        KeyCode::Char('s') => v.next_sort(),
        KeyCode::Char('S') => v.reverse = !v.reverse,
        KeyCode::Char('/') => *input = Some(String::new()),
        KeyCode::Char('n') => return Action::NextNetns,
        KeyCode::Char('p') => v.paused = !v.paused,
        KeyCode::Char('?') => v.help = !v.help,
        _ => {}
    }
    Action::Redraw
}
