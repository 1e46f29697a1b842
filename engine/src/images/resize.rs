//! PIL's `Image.resize(..., BICUBIC)` for 8-bit RGB, to the level: a separable convolution with
//! the a = −0.5 cubic kernel widened by the scale when shrinking (antialiasing), coefficients in
//! 22-bit fixed point, the horizontal pass first into an 8-bit image, then the vertical pass. A
//! float or non-antialiased bicubic moves pixels by a level or more and, on large photos, far more.

use super::RgbImage;

/// Fixed-point bits of the coefficients: 32 bits less 8 for the pixel and 2 for overshoot.
const BITS: u32 = 22;

fn cubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// One output sample's taps: the first input index and fixed-point weights.
struct Taps {
    first: usize,
    weights: Vec<i32>,
}

/// The taps of each of `out` samples over `len` inputs (PIL's `precompute_coeffs` with the box
/// spanning the whole input, then its 8-bit normalisation).
fn taps(len: usize, out: usize) -> Vec<Taps> {
    let scale = len as f64 / out as f64;
    let filter_scale = scale.max(1.0);
    let support = 2.0 * filter_scale;
    (0..out)
        .map(|i| {
            let center = (i as f64 + 0.5) * scale;
            // C's truncating casts, as PIL rounds the window's ends.
            let lo = ((center - support + 0.5) as i64).max(0) as usize;
            let hi = ((center + support + 0.5) as i64).min(len as i64) as usize;
            let raw: Vec<f64> = (lo..hi)
                .map(|x| cubic((x as f64 - center + 0.5) / filter_scale))
                .collect();
            let sum: f64 = raw.iter().sum();
            let weights = raw
                .iter()
                .map(|&w| {
                    let w = if sum != 0.0 { w / sum } else { w };
                    let fixed = w * f64::from(1u32 << BITS);
                    (if w < 0.0 { fixed - 0.5 } else { fixed + 0.5 }) as i32
                })
                .collect();
            Taps { first: lo, weights }
        })
        .collect()
}

fn clip(acc: i32) -> u8 {
    (acc >> BITS).clamp(0, 255) as u8
}

/// `image` resized to `width` × `height`, level for level as PIL's bicubic resize.
pub fn resize_bicubic(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (w, h) = (image.width as usize, image.height as usize);
    let (ow, oh) = (width as usize, height as usize);
    if (w, h) == (ow, oh) {
        return image.clone();
    }
    let rows = taps(h, oh);
    // The horizontal pass covers only the input rows the vertical pass reads.
    let (first_row, last_row) = match (rows.first(), rows.last()) {
        (Some(f), Some(l)) => (f.first, l.first + l.weights.len()),
        _ => (0, 0),
    };
    let (mid, mid_w) = if ow != w {
        let cols = taps(w, ow);
        let mut mid = vec![0u8; (last_row - first_row) * ow * 3];
        for (y, out_row) in mid.chunks_exact_mut(ow * 3).enumerate() {
            let in_row = &image.pixels[(first_row + y) * w * 3..][..w * 3];
            for (t, px) in cols.iter().zip(out_row.chunks_exact_mut(3)) {
                let mut acc = [1i32 << (BITS - 1); 3];
                for (k, &wt) in t.weights.iter().enumerate() {
                    let src = &in_row[(t.first + k) * 3..][..3];
                    for c in 0..3 {
                        acc[c] += i32::from(src[c]) * wt;
                    }
                }
                for c in 0..3 {
                    px[c] = clip(acc[c]);
                }
            }
        }
        (mid, ow)
    } else {
        let rows_used = &image.pixels[first_row * w * 3..last_row * w * 3];
        (rows_used.to_vec(), w)
    };
    if oh == h {
        return RgbImage {
            width,
            height,
            pixels: mid,
        };
    }
    let stride = mid_w * 3;
    let mut pixels = vec![0u8; oh * stride];
    for (t, out_row) in rows.iter().zip(pixels.chunks_exact_mut(stride)) {
        for (x, v) in out_row.iter_mut().enumerate() {
            let mut acc = 1i32 << (BITS - 1);
            for (k, &wt) in t.weights.iter().enumerate() {
                acc += i32::from(mid[(t.first - first_row + k) * stride + x]) * wt;
            }
            *v = clip(acc);
        }
    }
    RgbImage {
        width,
        height,
        pixels,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(width: u32, height: u32, v: u8) -> RgbImage {
        RgbImage {
            width,
            height,
            pixels: vec![v; (width * height * 3) as usize],
        }
    }

    #[test]
    fn a_flat_image_stays_flat_either_way() {
        for (w, h) in [(7, 5), (64, 48), (3, 200)] {
            for (ow, oh) in [(32, 32), (13, 9), (128, 96)] {
                let out = resize_bicubic(&flat(w, h, 77), ow, oh);
                assert_eq!((out.width, out.height), (ow, oh));
                assert!(out.pixels.iter().all(|&v| v == 77), "{w}x{h} -> {ow}x{oh}");
            }
        }
    }

    #[test]
    fn shrinking_widens_the_kernel() {
        // Each output of a 4x shrink reads 4 * 4 + 1 input columns (antialiasing), not 4.
        let t = taps(64, 16);
        assert_eq!(t[8].weights.len(), 16);
        assert!(taps(16, 64).iter().all(|t| t.weights.len() <= 4));
        // Fixed-point weights sum to one within rounding.
        for t in taps(100, 37) {
            let s: i32 = t.weights.iter().sum();
            assert!((s - (1 << BITS)).abs() <= t.weights.len() as i32, "{s}");
        }
    }
}
