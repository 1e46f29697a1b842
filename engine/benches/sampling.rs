//! The sampler's cost per row on a Qwen3-sized vocabulary (151,936 logits), for the settings the
//! shipped models' generation configs ask for, beside a full sort of the candidates (what a
//! sampler that ranks the whole vocabulary pays, as this one did before it ranked lazily); then a
//! step of 32 sampled rows taken in turn and spread over the threads, as the engine now takes
//! them (`sequence::accept_all`).
//! `cargo bench -p pio-engine --bench sampling`.

use std::time::Instant;

use pio_engine::sampling::{Sampler, SamplingParams};

const VOCAB: usize = 151_936;
const ROWS: usize = 200;

/// Deterministic noise in [-1, 1) (xorshift), so every run ranks the same logits.
fn noise(state: &mut u64) -> f32 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    (*state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

/// Logits shaped like a language model's: a broad floor and a few dozen plausible tokens well
/// above it (`peaked`), or the floor alone (`flat`, the worst case for top-p).
fn logits(peaked: bool, seed: u64) -> Vec<f32> {
    let mut state = seed | 1;
    let mut row: Vec<f32> = (0..VOCAB).map(|_| 3.0 * noise(&mut state)).collect();
    if peaked {
        for rank in 0..40 {
            let at = (noise(&mut state).abs() * VOCAB as f32) as usize % VOCAB;
            row[at] = 18.0 - rank as f32 * 0.4;
        }
    }
    row
}

fn per_row_us(params: &SamplingParams, rows: &[Vec<f32>]) -> f64 {
    let mut sampler = Sampler::new(params.clone());
    let start = Instant::now();
    let mut sink = 0u64;
    for row in rows {
        sink += u64::from(sampler.sample(row, &[], &[]));
    }
    std::hint::black_box(sink);
    start.elapsed().as_secs_f64() * 1e6 / rows.len() as f64
}

/// A full ranking of each row's candidates: the floor every whole-vocabulary sort pays.
fn full_sort_us(rows: &[Vec<f32>]) -> f64 {
    let start = Instant::now();
    for row in rows {
        let mut candidates: Vec<(u32, f32)> = row
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l))
            .collect();
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        std::hint::black_box(&candidates);
    }
    start.elapsed().as_secs_f64() * 1e6 / rows.len() as f64
}

fn main() {
    let settings = [
        ("greedy", SamplingParams::default()),
        (
            "qwen3 (t 0.7, top-k 20, top-p 0.8)",
            SamplingParams {
                temperature: Some(0.7),
                top_k: Some(20),
                top_p: Some(0.8),
                ..SamplingParams::default()
            },
        ),
        (
            "glm (t 1.0, top-p 0.95)",
            SamplingParams {
                temperature: Some(1.0),
                top_p: Some(0.95),
                ..SamplingParams::default()
            },
        ),
        (
            "t 1.0, min-p 0.05",
            SamplingParams {
                temperature: Some(1.0),
                min_p: Some(0.05),
                ..SamplingParams::default()
            },
        ),
        (
            "t 1.0 alone",
            SamplingParams {
                temperature: Some(1.0),
                ..SamplingParams::default()
            },
        ),
    ];
    println!("sampler, {VOCAB} logits a row, {ROWS} rows; µs a row (ratio: full sort ÷ sampler)");
    for (shape, peaked) in [("peaked", true), ("flat", false)] {
        let rows: Vec<Vec<f32>> = (0..ROWS as u64).map(|s| logits(peaked, s + 1)).collect();
        let sort = full_sort_us(&rows);
        println!("{shape} logits: full sort {sort:.0} µs");
        for (name, params) in &settings {
            let us = per_row_us(params, &rows);
            println!("  {name:<36} {us:>8.0} µs  ({:.1}x)", sort / us);
        }
    }
    step_of_rows(&settings[1].1);
}

/// A step's 32 rows with `params`, each with its own sampler: in turn, then over rayon's threads.
fn step_of_rows(params: &SamplingParams) {
    use rayon::prelude::*;
    const STEP: usize = 32;
    let rows: Vec<Vec<f32>> = (0..STEP as u64).map(|s| logits(true, s + 7)).collect();
    let mut samplers: Vec<Sampler> = (0..STEP).map(|_| Sampler::new(params.clone())).collect();
    let time = |parallel: bool, samplers: &mut Vec<Sampler>| {
        let start = Instant::now();
        for _ in 0..10 {
            let picks: Vec<u32> = if parallel {
                samplers
                    .par_iter_mut()
                    .zip(&rows)
                    .map(|(s, row)| s.sample(row, &[], &[]))
                    .collect()
            } else {
                samplers
                    .iter_mut()
                    .zip(&rows)
                    .map(|(s, row)| s.sample(row, &[], &[]))
                    .collect()
            };
            std::hint::black_box(picks);
        }
        start.elapsed().as_secs_f64() * 1e3 / 10.0
    };
    let (serial, parallel) = (time(false, &mut samplers), time(true, &mut samplers));
    println!(
        "a step of {STEP} rows (qwen3 settings): in turn {serial:.2} ms, over {} threads \
         {parallel:.2} ms ({:.1}x)",
        rayon::current_num_threads(),
        serial / parallel
    );
}
