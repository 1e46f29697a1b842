//! A plugin that brings its own global allocator (jemalloc, mimalloc) links the engine without
//! its default feature `mapped-weights`: this test binary declares one, which would not link
//! beside the engine's, loads a fixture with mapping asked for (the default), and the weights
//! come through its allocator, read rather than mapped, and still match transformers.
//!
//! Run: `cargo test -p pio-engine --no-default-features --test own_allocator` (CI does); with
//! the default features this file is empty.

#![cfg(not(feature = "mapped-weights"))]
#![allow(clippy::unwrap_used)]

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use pio_engine::models::qwen3::Qwen3;

/// The system's allocator, counting the bytes it hands out.
struct Counting;

static HANDED_OUT: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is the system allocator's, with the caller's own arguments.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        HANDED_OUT.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's promise for `layout`.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` above with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[test]
fn a_plugins_own_allocator_gets_the_weights_and_the_model_matches() {
    let dir = common::fixtures().join("qwen3-tiny");
    let weights: usize = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .map(|p| std::fs::metadata(p).unwrap().len() as usize)
        .sum();
    let before = HANDED_OUT.load(Ordering::Relaxed);
    common::check_checkpoint::<Qwen3>("qwen3-tiny");
    let handed = HANDED_OUT.load(Ordering::Relaxed) - before;
    assert!(
        handed >= weights,
        "the weights ({weights} bytes) were read through this allocator: {handed} bytes handed out"
    );
}
