//! Where a forward pass's time goes, per kind of operation, when the model's options ask for it
//! (`profile = true` under `[model.options]`; `pio bench --profile` sets it): the engine thread
//! times each forward pass and, inside it, the outermost linear layer, attention or output head
//! call; the rest of the pass (norms, activations, RoPE, routing, copies) is what is left. The
//! totals since load travel with every request's outcome (`timings.profile`). Off, a scope costs
//! one relaxed load.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// A kind of operation the profile times (its discriminant indexes the totals).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A whole forward pass.
    Forward,
    /// A linear layer on weights in the model dtype.
    DenseLinear,
    /// A linear layer on quantized weights.
    QuantizedLinear,
    /// Attention over the KV cache.
    Attention,
    /// The final norm and output projection.
    Head,
}

impl Op {
    /// Every kind, in report order.
    pub const ALL: [Op; 5] = [
        Op::Forward,
        Op::DenseLinear,
        Op::QuantizedLinear,
        Op::Attention,
        Op::Head,
    ];

    /// Its key in the outcome's `timings.profile` (microseconds).
    pub fn key(self) -> &'static str {
        match self {
            Op::Forward => "forward_us",
            Op::DenseLinear => "dense_linear_us",
            Op::QuantizedLinear => "quantized_linear_us",
            Op::Attention => "attention_us",
            Op::Head => "head_us",
        }
    }
}

/// Accumulated times, per kind.
#[derive(Debug)]
pub struct Profile {
    enabled: AtomicBool,
    nanos: [AtomicU64; 5],
    tokens: AtomicU64,
}

impl Profile {
    /// An empty profile, off.
    pub const fn new() -> Self {
        Self {
            enabled: AtomicBool::new(false),
            nanos: [const { AtomicU64::new(0) }; 5],
            tokens: AtomicU64::new(0),
        }
    }

    /// Starts timing.
    pub fn enable(&self) {
        self.enabled.store(true, Ordering::Relaxed);
    }

    /// A timer for `op` until the scope is dropped; `None` when off, or inside another timed
    /// operation (a head's linear layer counts as the head).
    pub fn scope(&self, op: Op) -> Option<Scope<'_>> {
        if !self.enabled.load(Ordering::Relaxed) {
            return None;
        }
        let nested = op != Op::Forward;
        if nested && INSIDE.with(|c| c.replace(true)) {
            return None;
        }
        Some(Scope {
            profile: self,
            op,
            nested,
            start: Instant::now(),
        })
    }

    /// Counts `n` tokens run through a forward pass.
    pub fn tokens(&self, n: usize) {
        if self.enabled.load(Ordering::Relaxed) {
            self.tokens.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// The totals since load as `{"tokens": …, "forward_us": …, …}`; `None` when off.
    pub fn snapshot(&self) -> Option<serde_json::Map<String, serde_json::Value>> {
        if !self.enabled.load(Ordering::Relaxed) {
            return None;
        }
        let mut map = serde_json::Map::new();
        map.insert("tokens".into(), self.tokens.load(Ordering::Relaxed).into());
        for (op, nanos) in Op::ALL.iter().zip(&self.nanos) {
            map.insert(
                op.key().into(),
                (nanos.load(Ordering::Relaxed) / 1000).into(),
            );
        }
        Some(map)
    }
}

impl Default for Profile {
    fn default() -> Self {
        Self::new()
    }
}

thread_local! {
    /// Whether this thread is inside a timed operation.
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

/// A running timer (see [`Profile::scope`]).
#[derive(Debug)]
pub struct Scope<'a> {
    profile: &'a Profile,
    op: Op,
    nested: bool,
    start: Instant,
}

impl Drop for Scope<'_> {
    fn drop(&mut self) {
        let nanos = self.start.elapsed().as_nanos() as u64;
        self.profile.nanos[self.op as usize].fetch_add(nanos, Ordering::Relaxed);
        if self.nested {
            INSIDE.with(|c| c.set(false));
        }
    }
}

/// The worker's profile (a worker serves one model).
pub static PROFILE: Profile = Profile::new();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_outermost_operation_counts_and_off_costs_nothing() {
        let p = Profile::new();
        assert!(p.scope(Op::Forward).is_none() && p.snapshot().is_none());
        p.enable();
        {
            let _f = p.scope(Op::Forward);
            let head = p.scope(Op::Head);
            assert!(head.is_some());
            assert!(p.scope(Op::DenseLinear).is_none(), "inside the head");
            std::thread::sleep(std::time::Duration::from_millis(2));
            drop(head);
            let _l = p.scope(Op::DenseLinear).expect("after the head");
            p.tokens(3);
        }
        let s = p.snapshot().unwrap();
        assert_eq!(s["tokens"], 3);
        let us = |k: &str| s[k].as_u64().unwrap();
        assert!(us("head_us") >= 2000 && us("forward_us") >= us("head_us"));
        assert_eq!(us("attention_us"), 0);
    }
}
