//! Process-wide switches for the engine's own GPU kernels: read once from the environment, set
//! by the GPU bench and tests, which time and check each arm.

use std::sync::atomic::{AtomicU8, Ordering};

/// On unless its environment variable holds its `off` value, or [`Switch::set`] said otherwise.
#[derive(Debug)]
pub struct Switch {
    /// 0: the environment not read yet; 1: on; 2: off.
    state: AtomicU8,
    var: &'static str,
    off: &'static str,
}

impl Switch {
    /// A switch read from `var`, off where it equals `off`.
    pub const fn new(var: &'static str, off: &'static str) -> Self {
        Self {
            state: AtomicU8::new(0),
            var,
            off,
        }
    }

    /// Whether it is on.
    pub fn on(&self) -> bool {
        match self.state.load(Ordering::Relaxed) {
            0 => {
                let on = is_on(std::env::var(self.var).ok().as_deref(), self.off);
                self.set(on);
                on
            }
            state => state == 1,
        }
    }

    /// Switches it for the whole process.
    pub fn set(&self, on: bool) {
        self.state.store(if on { 1 } else { 2 }, Ordering::Relaxed);
    }
}

/// Whether a variable holding `value` (`None`: unset) leaves its switch on.
fn is_on(value: Option<&str>, off: &str) -> bool {
    value != Some(off)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_its_off_value_switches_it_off_and_set_overrides_it() {
        // A variable no one sets: on by default.
        static FREE: Switch = Switch::new("PIO_TEST_SWITCH_UNSET", "off");
        assert!(FREE.on());
        FREE.set(false);
        assert!(!FREE.on());
        FREE.set(true);
        assert!(FREE.on());
        assert!(is_on(None, "candle"));
        assert!(is_on(Some("cuda"), "candle"));
        assert!(is_on(Some(""), "candle"));
        assert!(!is_on(Some("candle"), "candle"));
    }
}
