//! The engine on a GPU (the `cuda` feature; tests/gpu/run.sh runs these on a machine with one):
//! the fixtures' greedy tokens and top-5 log-probabilities as transformers wrote them (Qwen3-VL's
//! images included), bf16 within the CPU's own bf16 error, a batch equal to each request alone,
//! prefix caching and preemption, the paged attention kernel equal to candle's gather path, the
//! fused layer kernels equal to candle's operations, the few-row projection kernel equal to
//! cuBLAS's, the best entries for top-k samplers equal to the host's, the GPU memory cap, and the device opened without per-buffer events. Without a
//! device each test says so and passes. Run them one at a time (`--test-threads=1`, as check.sh
//! does): two of them switch the engine's kernels off and on for the whole process.
#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::testing::{max_abs_diff, normal};
use common::*;
use pio_engine::attention::{paged, paged_batch, PagedKv};
use pio_engine::batch::{Batch, Positions, SeqStep, Wanted};
use pio_engine::candle_core::{DType, Device, Tensor};
use pio_engine::checkpoint::Checkpoint;
use pio_engine::generate::CausalLm;
use pio_engine::linear::Quantization;
use pio_engine::models::glm4_moe_lite::Glm4MoeLite;
use pio_engine::models::qwen3::{Qwen3, Qwen3Moe};
use pio_engine::runtime::{LoadModel, ModelRuntime};
use pio_engine::serving::{Engine, EngineConfig};
use pio_engine::text::TextCodec;
use pio_plugin_api::sinks::NoProgress;
use pio_plugin_api::wire::{HostContext, ModelConfig};
use pio_plugin_api::{ErrorKind, Progress};

/// The first GPU, or `None` after saying why the test does not run.
fn gpu() -> Option<Device> {
    match pio_engine::runtime::open_gpu(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e})");
            None
        }
    }
}

fn load_on<M: LoadModel>(name: &str, dtype: DType, device: &Device) -> M {
    let checkpoint = Checkpoint::open(&fixtures().join(name)).unwrap();
    M::load(
        &checkpoint,
        dtype,
        Quantization::None,
        device,
        &mut |_, _| {},
    )
    .unwrap()
}

fn engine_on<M: LoadModel + CausalLm>(name: &str, device: &Device) -> Engine {
    let checkpoint = Checkpoint::open(&fixtures().join(name)).unwrap();
    let codec = TextCodec::load(&checkpoint).unwrap();
    let model = load_on::<M>(name, DType::F32, device);
    Engine::start(Arc::new(model), Arc::new(codec), EngineConfig::default()).unwrap()
}

fn f32_parity<M: LoadModel + CausalLm>(name: &str) {
    let Some(device) = gpu() else { return };
    let checkpoint = Checkpoint::open(&fixtures().join(name)).unwrap();
    let engine = engine_on::<M>(name, &device);
    for case in cases(&checkpoint, name) {
        let (out, _) = run_alone(&engine, &case);
        assert_eq!(out.len(), case.request.max_tokens);
        assert_matches(&out, &case.golden);
    }
}

#[test]
fn qwen3_on_the_gpu_matches_transformers() {
    f32_parity::<Qwen3>("qwen3-tiny");
}

#[test]
fn qwen3_moe_on_the_gpu_matches_transformers() {
    f32_parity::<Qwen3Moe>("qwen3-moe-tiny");
}

#[test]
fn glm_on_the_gpu_matches_transformers() {
    f32_parity::<Glm4MoeLite>("glm4-moe-lite-tiny");
}

/// Qwen3-VL on the GPU: every golden case (no image, one, two in a message, images in two turns)
/// alone and then batched gives transformers' tokens — the vision tower, DeepStack and M-RoPE
/// positions on the device.
#[test]
fn qwen3_vl_on_the_gpu_matches_transformers() {
    let Some(device) = gpu() else { return };
    let f = common::vl::fixture_on(&device);
    let cases: Vec<_> = common::vl::golden()["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (common::vl::request(&f, c), c.clone()))
        .collect();
    for case in &cases {
        common::vl::run_all(&f, EngineConfig::default(), std::slice::from_ref(case));
    }
    common::vl::run_all(&f, EngineConfig::default(), &cases);
}

/// Teacher-forced log-probabilities of fixture `name` in `dtype` with `q` on `device`.
fn teacher_forced<M: LoadModel + CausalLm>(
    name: &str,
    (dtype, q): (DType, Quantization),
    device: &Device,
) -> Vec<Vec<f32>> {
    let path = fixtures().join(name);
    common::distributions_on::<M>(&path, name, (dtype, q, None), device)
}

/// `candidate`'s (agreement, mean, max |Δ|) against `reference` is of the size of `baseline`'s:
/// the same weights rounded the same way, accumulated in another order on the GPU.
fn errs_as_much_as(what: &str, baseline: (f32, f32, f32), candidate: (f32, f32, f32)) {
    eprintln!("{what} against f32 (agreement, mean, max |Δ|): cpu {baseline:?}, gpu {candidate:?}");
    assert!(
        candidate.0 >= baseline.0 - 0.05,
        "{what}: top-1 agreement {candidate:?} vs {baseline:?}"
    );
    assert!(
        candidate.1 <= 2.0 * baseline.1 + 0.01,
        "{what}: mean |Δ| {candidate:?} vs {baseline:?}"
    );
}

#[test]
fn bf16_and_quantized_weights_on_the_gpu_err_no_more_than_on_the_cpu() {
    let Some(device) = gpu() else { return };
    let name = "qwen3-tiny";
    let reference = teacher_forced::<Qwen3>(name, (DType::F32, Quantization::None), &Device::Cpu);
    // bf16 through cuBLAS; q8 and q4 blocks through candle's CUDA kernels (activations
    // quantized to 8 bits there too).
    for (what, format) in [
        ("bf16", (DType::BF16, Quantization::None)),
        ("q8", (DType::F32, Quantization::Q8)),
        ("q4", (DType::F32, Quantization::Q4)),
    ] {
        let cpu = agreement(
            &reference,
            &teacher_forced::<Qwen3>(name, format, &Device::Cpu),
        );
        let gpu = agreement(&reference, &teacher_forced::<Qwen3>(name, format, &device));
        errs_as_much_as(what, cpu, gpu);
    }
}

/// The fused layer kernels (`engine/src/cuda/fused.cu`: residual add with the next norm; the
/// query/key norms, rotation and KV writes; SwiGLU), the grouped routed experts
/// (`experts.cu`) and prompt chunks on the attention kernel give what candle's separate
/// operations give: in f32 the same distributions but for the order of a sum; in bf16 within one
/// rounding of the 16-bit values (the kernels round where candle wrote an intermediate out). And
/// they did run.
#[test]
fn the_fused_layer_kernels_give_what_candles_operations_give() {
    let Some(device) = gpu() else { return };
    let both = [(DType::F32, 1e-4), (DType::BF16, 0.02)];
    fused_matches_separate::<Qwen3>("qwen3-tiny", &device, &both);
    // The sparse models in f32 only: in bf16 a rounding's difference can flip a near-tied
    // router's choice, which moves that position's distribution by more than a rounding (the
    // emulated harness checks the expert kernels' bf16 arithmetic itself).
    let f32_only = [(DType::F32, 1e-4)];
    fused_matches_separate::<Qwen3Moe>("qwen3-moe-tiny", &device, &f32_only);
    fused_matches_separate::<Glm4MoeLite>("glm4-moe-lite-tiny", &device, &f32_only);
}

fn fused_matches_separate<M: LoadModel + CausalLm>(
    name: &str,
    device: &Device,
    dtypes: &[(DType, f32)],
) {
    use pio_engine::cuda::fused;
    for &(dtype, bound) in dtypes {
        pio_engine::cuda::KERNELS.set(false);
        let before = fused::launches();
        let separate = teacher_forced::<M>(name, (dtype, Quantization::None), device);
        assert_eq!(fused::launches(), before, "switched off, nothing fused ran");
        pio_engine::cuda::KERNELS.set(true);
        let together = teacher_forced::<M>(name, (dtype, Quantization::None), device);
        assert!(
            fused::launches() > before,
            "{name} {dtype:?}: the fused kernels ran"
        );
        let (agree, mean, max) = agreement(&separate, &together);
        eprintln!(
            "{name} {dtype:?}: fused vs separate: agreement {agree}, mean |Δ| {mean}, max {max}"
        );
        assert!(
            agree >= 0.95 && mean <= bound,
            "{name} {dtype:?}: {agree} {mean} {max}"
        );
        if dtype == DType::F32 {
            assert!(
                agree == 1.0 && max <= 10.0 * bound,
                "{name} f32: {agree} {mean} {max}"
            );
        }
    }
}

#[test]
fn a_batch_on_the_gpu_gives_each_request_its_own_tokens() {
    let Some(device) = gpu() else { return };
    let name = "qwen3-tiny";
    let checkpoint = Checkpoint::open(&fixtures().join(name)).unwrap();
    let engine = engine_on::<Qwen3>(name, &device);
    let cases = cases(&checkpoint, name);
    let streams: Vec<_> = cases
        .iter()
        .map(|c| engine.submit(c.request.clone()).unwrap())
        .collect();
    for (case, stream) in cases.iter().zip(streams) {
        let (out, _) = collect(stream);
        assert_matches(&out, &case.golden);
    }
    assert!(
        engine.stats().batched_seqs > engine.stats().steps,
        "the requests shared forward passes"
    );
}

/// Prefix caching and preemption as on the CPU (engine/tests/batching.rs): 30 blocks of 4 cannot
/// hold the longest prompt three times over beside the others, so sequences are preempted while
/// sharing cached blocks with those that keep running; every answer is still transformers'.
#[test]
fn prefix_caching_and_preemption_on_the_gpu_give_the_same_tokens() {
    let Some(device) = gpu() else { return };
    let name = "qwen3-tiny";
    let checkpoint = Checkpoint::open(&fixtures().join(name)).unwrap();
    let codec = TextCodec::load(&checkpoint).unwrap();
    let model = load_on::<Qwen3>(name, DType::F32, &device);
    let config = EngineConfig {
        block_size: 4,
        kv_blocks: 30,
        ..EngineConfig::default()
    };
    let engine = Engine::start(Arc::new(model), Arc::new(codec), config).unwrap();
    let cases = cases(&checkpoint, name);
    let longest = cases.iter().max_by_key(|c| c.request.prompt.len()).unwrap();
    let load: Vec<&Case> = [longest, longest, longest]
        .into_iter()
        .chain(cases.iter())
        .collect();
    let results = run_concurrently(&engine, load.iter().map(|c| c.request.clone()));
    for (case, (out, _)) in load.iter().zip(&results) {
        assert_matches(out, &case.golden);
    }
    let stats = engine.stats();
    assert!(stats.preemptions > 0, "the pool was too small: {stats:?}");
    assert!(stats.prefix_hit_tokens > 0, "{stats:?}");
    assert_eq!(stats.blocks_used, 0, "{stats:?}");
}

/// One pool shape the kernel is checked on: `(kv_heads, heads, head_dim, value_dim)`, and whether
/// the values are the keys themselves (MLA's latent cache).
struct PoolCase {
    dtype: DType,
    heads: (usize, usize),
    dims: (usize, usize),
    values_are_keys: bool,
    bound: f32,
}

/// The kernel's rows, in a batch of decode rows and a prompt chunk, against candle's gather path
/// in f32 on the same (rounded) inputs; with the engine's kernels switched off for prompts
/// (`PIO_GPU_KERNELS=candle`) the chunk takes the gather path itself, and is identical to it.
fn kernel_matches_gather(device: &Device, case: &PoolCase) {
    let (block_size, slots) = (16, 16 * 12);
    let ((kv_heads, heads), (head_dim, value_dim)) = (case.heads, case.dims);
    let rounded = |t: Tensor| t.to_dtype(case.dtype).unwrap();
    let keys = rounded(normal(0.0, 1.0, (slots, kv_heads, head_dim), device, 1));
    let values = if case.values_are_keys {
        keys.clone()
    } else {
        rounded(normal(0.5, 1.0, (slots, kv_heads, head_dim), device, 2))
    };
    // Decode rows at lengths that end mid-block, and at 1 and 3 positions (warps left idle);
    // the third sequence is a 3-token prompt chunk at positions 5..8, the last a 20-token one
    // from position 0 across two blocks.
    let tables: [Vec<u32>; 6] = [
        vec![3, 7, 1],
        vec![0],
        vec![6, 8],
        vec![10],
        vec![11, 2, 9, 4, 5],
        vec![7, 3],
    ];
    let starts = [40usize, 0, 5, 2, 70, 0];
    let chunk: Vec<u32> = (0..20).collect();
    let tokens: [&[u32]; 6] = [&[1], &[2], &[3, 4, 5], &[6], &[7], &chunk];
    let batch = Batch::new(
        (0..6)
            .map(|i| SeqStep {
                tokens: tokens[i],
                splices: &[],
                start: starts[i],
                positions: &Positions::Linear,
                blocks: &tables[i],
                logits: Wanted::Logits,
                score: None,
            })
            .collect(),
    );
    let rows = batch.rows();
    let q = rounded(normal(0.0, 1.0, (rows, heads, head_dim), device, 3));
    let shape = (block_size, value_dim);
    assert!(
        pio_engine::cuda::takes(&q, &keys, &values, shape),
        "the kernel takes this pool"
    );
    let scale = 1.0 / (head_dim as f64).sqrt();
    let widen = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let (q32, k32, v32) = (widen(&q), widen(&keys), widen(&values));
    for prompts_on_kernel in [true, false] {
        pio_engine::cuda::KERNELS.set(prompts_on_kernel);
        let fused = paged_batch(&q, &batch, &keys, &values, shape, scale).unwrap();
        pio_engine::cuda::KERNELS.set(true);
        let mut row = 0;
        for (i, seq) in batch.seqs.iter().enumerate() {
            let n = seq.tokens.len();
            // The kernel's rows against f32; a chunk on the gather path is that path: identical.
            let (q, keys, values, bound) = if n == 1 || prompts_on_kernel {
                (&q32, &k32, &v32, case.bound)
            } else {
                (&q, &keys, &values, f32::MIN_POSITIVE)
            };
            let kv = PagedKv {
                keys,
                values,
                value_dim,
                blocks: seq.blocks,
                block_size,
            };
            let reference =
                widen(&paged(&q.narrow(0, row, n).unwrap(), &kv, seq.start, scale).unwrap());
            let diff = max_abs_diff(&fused.narrow(0, row, n).unwrap(), &reference);
            assert!(
                diff < bound,
                "{:?} sequence {i} (prompts on the kernel: {prompts_on_kernel}): max |Δ| {diff}",
                case.dtype
            );
            row += n;
        }
    }
}

#[test]
fn the_paged_attention_kernel_reads_blocks_as_the_gather_path_does() {
    let Some(device) = gpu() else { return };
    // f32 to rounding; bf16 and f16 outputs are rounded once from f32 (half an ulp of values
    // of magnitude up to ~4: 2^-9·4 for bf16, 2^-12·4 for f16, with slack).
    for (dtype, bound) in [
        (DType::F32, 1e-4),
        (DType::BF16, 1.6e-2),
        (DType::F16, 2e-3),
    ] {
        let gqa = PoolCase {
            dtype,
            heads: (2, 8),
            dims: (64, 64),
            values_are_keys: false,
            bound,
        };
        kernel_matches_gather(&device, &gqa);
    }
    // GLM-4.7-Flash's latent cache: one 576-wide head of keys whose first 512 are the values.
    let mla = PoolCase {
        dtype: DType::F32,
        heads: (1, 4),
        dims: (576, 512),
        values_are_keys: true,
        bound: 1e-4,
    };
    kernel_matches_gather(&device, &mla);
}

fn runtime_with_cap(cap: u64) -> (ModelRuntime<Qwen3>, ModelConfig) {
    let mut runtime = ModelRuntime::<Qwen3>::new(None);
    runtime.initialize(&HostContext {
        gpu_memory_limit_bytes: Some(cap),
        ..Default::default()
    });
    let config = ModelConfig {
        model_path: Some(fixtures().join("qwen3-tiny")),
        device: Some("cuda".into()),
        ..Default::default()
    };
    (runtime, config)
}

#[test]
fn the_gpu_memory_cap_refuses_a_model_that_does_not_fit_and_holds_one_that_does() {
    if gpu().is_none() {
        return;
    }
    let (mut runtime, config) = runtime_with_cap(64 << 10);
    let e = runtime
        .load_model(&config, &mut Progress::new(NoProgress::boxed()))
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::OUT_OF_MEMORY, "{e}");
    assert!(
        e.message.contains("limits.gpu_memory") && e.message.contains(&(64u64 << 10).to_string()),
        "names the cap and its size: {e}"
    );
    let cap = 2u64 << 30;
    let (mut runtime, config) = runtime_with_cap(cap);
    let info = runtime
        .load_model(&config, &mut Progress::new(NoProgress::boxed()))
        .unwrap();
    assert_eq!(info.device_memory_limit_bytes, Some(cap));
    let used = info.device_memory_bytes.unwrap();
    assert!(
        used > info.weight_bytes.unwrap() && used <= cap,
        "weights and pool inside the cap: {used} of {cap}"
    );
}

/// A model's device (`device = "cuda"`) makes no CUDA events per buffer: the engine drives one
/// stream, and two events made and destroyed with each of a step's buffers are host time a
/// launch-bound step does not have.
#[test]
fn the_engine_opens_its_gpu_without_per_buffer_events() {
    if gpu().is_none() {
        return;
    }
    let config = ModelConfig {
        device: Some("cuda:0".into()),
        ..Default::default()
    };
    let device = pio_engine::runtime::device_of(&config).unwrap();
    let Device::Cuda(gpu) = &device else {
        panic!("cuda:0 opened {device:?}")
    };
    assert!(!gpu.is_event_tracking(), "event tracking is off");
    // And a fresh candle device, for contrast, tracks: the switch is the engine's own.
    let Device::Cuda(plain) = Device::new_cuda(0).unwrap() else {
        unreachable!()
    };
    assert!(plain.is_event_tracking());
}

/// A top-k sampler's best entries found on the device are the host's `top_k` of the same rows,
/// ids and logits exactly, ties to the lower id: planted ties within a row and across the
/// kernel's thread lists, -inf, and rows asked for different k in one step.
#[test]
fn the_best_entries_found_on_the_gpu_are_the_hosts_top_k() {
    let Some(device) = gpu() else { return };
    let vocab = 151_936;
    let mut rows: Vec<Vec<f32>> = (0..5)
        .map(|r| {
            (0..vocab)
                .map(|i| ((i * 7919 + r * 31) % 4093) as f32 / 64.0)
                .collect()
        })
        .collect();
    rows[0][5] = 100.0;
    rows[0][5 + 256] = 100.0;
    rows[1][17] = f32::NEG_INFINITY;
    rows[2][vocab - 1] = 200.0;
    let flat: Vec<f32> = rows.concat();
    let logits = Tensor::from_vec(flat, (rows.len(), vocab), &device).unwrap();
    for k in [1, 20, 64] {
        let found = pio_engine::cuda::top_k::best_entries(&logits, k)
            .unwrap()
            .expect("the kernel takes f32 rows on the GPU");
        for (row, got) in rows.iter().zip(&found) {
            assert_eq!(got, &pio_engine::sampling::top_k(row, k), "k {k}");
        }
    }
    assert!(
        pio_engine::cuda::top_k::best_entries(&logits, 65)
            .unwrap()
            .is_none(),
        "over the kernel's 64, the rows are copied"
    );
}

/// The few-row projection kernel (`gemv.cu`) gives cuBLAS's product through candle: in f32 but
/// for the order of the sums; in bf16 and f16 within a rounding of outputs of magnitude up to
/// ~4 (each side rounds its own f32 sum once). Nine rows are past it.
#[test]
fn the_gemv_kernel_gives_cublas_products() {
    let Some(device) = gpu() else { return };
    let (n, k) = (6144, 2560);
    for (dtype, bound) in [(DType::F32, 1e-4), (DType::BF16, 4e-2), (DType::F16, 5e-3)] {
        let w = normal(0.0, 0.02, (n, k), &device, 1)
            .to_dtype(dtype)
            .unwrap();
        for rows in [1, 3, 8] {
            let x = normal(0.0, 1.0, (1, rows, k), &device, 100 + rows as u64)
                .to_dtype(dtype)
                .unwrap();
            let got = pio_engine::cuda::gemv::linear(&x, &w)
                .unwrap()
                .expect("the kernel takes a few rows");
            let want = x.broadcast_matmul(&w.t().unwrap()).unwrap();
            assert_eq!(got.dims(), want.dims());
            let diff = max_abs_diff(&got, &want);
            assert!(diff < bound, "{dtype:?}, {rows} rows: max |Δ| {diff}");
        }
        let nine = Tensor::zeros((9, k), dtype, &device).unwrap();
        assert!(pio_engine::cuda::gemv::linear(&nine, &w).unwrap().is_none());
    }
}
