//! Reproducible random tensors for tests: every run draws the same values, so a bound near a
//! format's own error cannot fail on one unlucky draw. The integration tests include this file
//! too (`tests/common`).

use candle_core::{Device, Shape, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// A tensor of `shape` on `device` drawn from the normal distribution of `mean` and `std`,
/// from `seed` (Box–Muller, both values of each pair used): `Tensor::randn` with a seed.
pub fn normal(mean: f32, std: f32, shape: impl Into<Shape>, device: &Device, seed: u64) -> Tensor {
    let shape = shape.into();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut values = Vec::with_capacity(shape.elem_count() + 1);
    while values.len() < shape.elem_count() {
        let u = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let (sin, cos) = (std::f64::consts::TAU * rng.random::<f64>()).sin_cos();
        let radius = (-2.0 * u.ln()).sqrt();
        for unit in [radius * cos, radius * sin] {
            values.push(mean + std * unit as f32);
        }
    }
    values.truncate(shape.elem_count());
    Tensor::from_vec(values, shape, device).expect("a tensor of the values drawn")
}

/// A tensor's values widened to f32, flattened in order.
pub fn f32_values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(candle_core::DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .expect("the tensor's values as f32")
}

/// The largest |a − b| over two tensors of one shape, compared in f32.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let widen = |t: &Tensor| t.to_dtype(candle_core::DType::F32).expect("widened to f32");
    (widen(a) - widen(b))
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("two tensors of one shape")
}
