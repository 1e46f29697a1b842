//! Qwen2-VL/Qwen3-VL image processing as transformers does it (`preprocessor_config.json`):
//! `smart_resize` to a multiple of patch × merge within the pixel budget, PIL bicubic resize,
//! rescale and normalize, then patches in the merge-block order the vision tower reads.

use serde::Deserialize;

use crate::checkpoint::{parse_json, Checkpoint};
use crate::images::{resize_bicubic, ImageError, RgbImage};
use crate::{EngineError, Result};

/// `size` of `preprocessor_config.json`.
#[derive(Debug, Clone, Deserialize)]
struct Size {
    shortest_edge: Option<u64>,
    longest_edge: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
struct Raw {
    size: Option<Size>,
    min_pixels: Option<u64>,
    max_pixels: Option<u64>,
    patch_size: Option<usize>,
    temporal_patch_size: Option<usize>,
    merge_size: Option<usize>,
    image_mean: Option<[f64; 3]>,
    image_std: Option<[f64; 3]>,
    rescale_factor: Option<f64>,
    resample: Option<u32>,
    do_resize: Option<bool>,
    do_rescale: Option<bool>,
    do_normalize: Option<bool>,
}

/// The image processor's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Processor {
    /// Fewest pixels after resizing.
    pub min_pixels: u64,
    /// Most pixels after resizing.
    pub max_pixels: u64,
    /// Side of a square patch.
    pub patch_size: usize,
    /// Frames per patch (a still image is repeated).
    pub temporal_patch_size: usize,
    /// Patches merged per side into one token.
    pub merge_size: usize,
    /// The mean and deviation in pixel levels (divided by the rescale factor): rescaling and
    /// normalizing in one step, in f32, as transformers' fast processor fuses them, so that
    /// every level is the same f32 as there (rescaled first, 111 of 256 levels were an ulp
    /// off, and mid-grey rounded to another bf16).
    mean: [f32; 3],
    std: [f32; 3],
}

/// One image ready for the vision tower.
#[derive(Debug, Clone)]
pub struct Patches {
    /// `(t, h, w)` in patches.
    pub grid: [usize; 3],
    /// `t * h * w` rows of `3 * temporal * patch * patch` values, merge-block order.
    pub values: Vec<f32>,
}

impl Patches {
    /// Tokens the image takes in the prompt.
    pub fn tokens(&self, merge: usize) -> usize {
        self.grid.iter().product::<usize>() / (merge * merge)
    }
}

impl Processor {
    /// Reads `preprocessor_config.json` (transformers' Qwen2-VL defaults where a field is absent).
    pub fn load(checkpoint: &Checkpoint) -> Result<Self> {
        let path = checkpoint.path("preprocessor_config.json");
        let text = std::fs::read_to_string(&path).map_err(|_| EngineError::MissingFile {
            path: path.clone(),
            hint:
                "a vision checkpoint needs its image processor settings (preprocessor_config.json)",
        })?;
        let raw: Raw = parse_json(&path, &text)?;
        let bad = |field: &str, reason: &str| EngineError::BadField {
            path: path.clone(),
            field: field.into(),
            reason: reason.into(),
        };
        // Explicit min/max_pixels win over `size`, as in transformers.
        let size = raw.size.as_ref();
        let min_pixels = raw
            .min_pixels
            .or(size.and_then(|s| s.shortest_edge))
            .unwrap_or(56 * 56);
        let max_pixels = raw
            .max_pixels
            .or(size.and_then(|s| s.longest_edge))
            .unwrap_or(28 * 28 * 1280);
        if min_pixels == 0 || min_pixels > max_pixels {
            return Err(bad(
                "size",
                "expected 0 < shortest_edge (min pixels) <= longest_edge (max pixels)",
            ));
        }
        let positive = |v: Option<usize>, default: usize, field: &str| match v.unwrap_or(default) {
            0 => Err(bad(field, "must be at least 1")),
            n => Ok(n),
        };
        if raw.resample.is_some_and(|r| r != 3) {
            return Err(bad("resample", "only bicubic (3) is supported"));
        }
        if raw.do_resize == Some(false)
            || raw.do_rescale == Some(false)
            || raw.do_normalize == Some(false)
        {
            return Err(bad(
                "do_resize",
                "turning off resizing, rescaling or normalizing is not supported",
            ));
        }
        let rescale = raw.rescale_factor.unwrap_or(1.0 / 255.0);
        if !(rescale.is_finite() && rescale > 0.0) {
            return Err(bad("rescale_factor", "must be a positive number"));
        }
        // As torch makes them: an f32 tensor of the values times the factor's inverse, in f32.
        let in_levels = |a: [f64; 3]| a.map(|v| v as f32 * (1.0 / rescale) as f32);
        let std = in_levels(raw.image_std.unwrap_or([0.5; 3]));
        if std.iter().any(|s| *s == 0.0 || !s.is_finite()) {
            return Err(bad("image_std", "must not be zero"));
        }
        Ok(Self {
            min_pixels,
            max_pixels,
            patch_size: positive(raw.patch_size, 16, "patch_size")?,
            temporal_patch_size: positive(raw.temporal_patch_size, 2, "temporal_patch_size")?,
            merge_size: positive(raw.merge_size, 2, "merge_size")?,
            mean: in_levels(raw.image_mean.unwrap_or([0.5; 3])),
            std,
        })
    }

    /// The size an image of `height` × `width` is resized to.
    pub fn target_size(
        &self,
        height: u32,
        width: u32,
    ) -> std::result::Result<(u32, u32), ImageError> {
        let factor = (self.patch_size * self.merge_size) as u64;
        smart_resize(height, width, factor, self.min_pixels, self.max_pixels)
    }

    /// Resizes, normalizes and patchifies one image.
    pub fn patches(&self, image: &RgbImage) -> std::result::Result<Patches, ImageError> {
        let (h, w) = self.target_size(image.height, image.width)?;
        let resized = resize_bicubic(image, w, h);
        let (p, t, m) = (self.patch_size, self.temporal_patch_size, self.merge_size);
        let (gh, gw) = (h as usize / p, w as usize / p);
        let row_len = 3 * t * p * p;
        let mut values = Vec::with_capacity(gh * gw * row_len);
        let level = |y: usize, x: usize, c: usize| {
            let v = f32::from(resized.pixels[(y * w as usize + x) * 3 + c]);
            (v - self.mean[c]) / self.std[c]
        };
        // Rows in merge-block order; columns (channel, frame, y, x). Every frame is the same
        // still image.
        for (row, col) in merge_block_cells(gh, gw, m) {
            let (py0, px0) = (row * p, col * p);
            for c in 0..3 {
                for _ in 0..t {
                    for y in 0..p {
                        values.extend((0..p).map(|x| level(py0 + y, px0 + x, c)));
                    }
                }
            }
        }
        Ok(Patches {
            grid: [1, gh, gw],
            values,
        })
    }
}

/// Each patch's `(row, col)` of a `gh × gw` grid in the order the processor writes them and the
/// vision tower reads them: `m × m` merge blocks row by row, each block's patches row by row.
pub(crate) fn merge_block_cells(gh: usize, gw: usize, m: usize) -> Vec<(usize, usize)> {
    let mut cells = Vec::with_capacity(gh * gw);
    for by in 0..gh / m {
        for bx in 0..gw / m {
            for my in 0..m {
                cells.extend((0..m).map(|mx| (by * m + my, bx * m + mx)));
            }
        }
    }
    cells
}

/// transformers' `smart_resize`: each side rounded to a multiple of `factor` (Python's
/// round-half-to-even), then scaled into `[min_pixels, max_pixels]` keeping the aspect ratio, in
/// the same floating-point order so that the token count matches to the token.
pub fn smart_resize(
    height: u32,
    width: u32,
    factor: u64,
    min_pixels: u64,
    max_pixels: u64,
) -> std::result::Result<(u32, u32), ImageError> {
    let (h, w) = (f64::from(height), f64::from(width));
    if h.max(w) / h.min(w) > 200.0 {
        return Err(ImageError::AspectRatio {
            width,
            height,
            limit: 200,
        });
    }
    let f = factor as f64;
    let mut h_bar = (h / f).round_ties_even() * f;
    let mut w_bar = (w / f).round_ties_even() * f;
    if h_bar * w_bar > max_pixels as f64 {
        let beta = (h * w / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    Ok((h_bar as u32, w_bar as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_rounds_half_to_even() {
        let real = |h, w| smart_resize(h, w, 32, 65_536, 16_777_216).unwrap();
        // 336 / 32 = 10.5: Python rounds to 10 (f64::round would give 11 and 21 more tokens).
        assert_eq!(real(336, 336), (320, 320));
        assert_eq!(real(480, 640), (480, 640));
        assert_eq!(real(224, 224), (256, 256));
        assert_eq!(real(1080, 1920), (1088, 1920));
        assert!(smart_resize(10, 2001, 32, 65_536, 16_777_216).is_err());
    }
}
