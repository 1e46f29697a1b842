//! Images through Qwen3-VL's processor against what transformers (with PIL) made of the same
//! files: sizes, token counts and every pixel value, and the bad inputs refused with a reason.

#![allow(clippy::unwrap_used)]

mod common;

use common::fixtures;
use pio_engine::candle_core::{Device, Tensor};
use pio_engine::checkpoint::Checkpoint;
use pio_engine::images::{decode, DecodeLimits, ImageError};
use pio_engine::models::qwen3_vl::{smart_resize, Processor};
use serde_json::Value;

fn golden() -> Value {
    let text = std::fs::read_to_string(fixtures().join("golden/qwen3-vl-tiny.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn processor() -> Processor {
    Processor::load(&Checkpoint::open(&fixtures().join("qwen3-vl-tiny")).unwrap()).unwrap()
}

fn image(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join("images").join(name)).unwrap()
}

#[test]
fn smart_resize_matches_transformers() {
    for case in golden()["smart_resize"].as_array().unwrap() {
        let n = |k: &str| case[k].as_u64().unwrap();
        let got = smart_resize(
            n("height") as u32,
            n("width") as u32,
            n("factor"),
            n("min_pixels"),
            n("max_pixels"),
        )
        .unwrap();
        let want = (
            case["out"][0].as_u64().unwrap() as u32,
            case["out"][1].as_u64().unwrap() as u32,
        );
        assert_eq!(got, want, "{case}");
    }
    for case in golden()["smart_resize_errors"].as_array().unwrap() {
        let n = |k: &str| case[k].as_u64().unwrap();
        let e = smart_resize(
            n("height") as u32,
            n("width") as u32,
            32,
            65_536,
            16_777_216,
        );
        assert!(matches!(e, Err(ImageError::AspectRatio { .. })), "{case}");
    }
}

#[test]
fn every_pixel_value_matches_transformers() {
    let golden = golden();
    let levels = pio_engine::candle_core::safetensors::load(
        fixtures().join("golden/qwen3-vl-tiny-pixels.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let processor = processor();
    for case in golden["images"].as_array().unwrap() {
        let file = case["file"].as_str().unwrap();
        let rgb = decode(&image(file), &DecodeLimits::default()).unwrap();
        let size = [rgb.height as u64, rgb.width as u64];
        assert_eq!(
            case["size"],
            serde_json::json!(size),
            "{file}: size after EXIF"
        );
        let patches = processor.patches(&rgb).unwrap();
        assert_eq!(
            case["image_grid_thw"],
            serde_json::json!(patches.grid),
            "{file}"
        );
        assert_eq!(
            case["num_image_tokens"].as_u64().unwrap() as usize,
            patches.tokens(2),
            "{file}"
        );
        let want: &Tensor = &levels[file];
        let want: Vec<u8> = want.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(want.len(), patches.values.len(), "{file}");
        let mut worst = (0.0f32, 0usize);
        for (i, (&l, &v)) in want.iter().zip(&patches.values).enumerate() {
            // Bit for bit the f32 transformers' fast processor makes of level `l`.
            let exact = (f32::from(l) - 127.5) / 127.5;
            assert_eq!(exact.to_bits(), v.to_bits(), "{file}: value {i}, level {l}");
            let d = (f32::from(l) / 127.5 - 1.0 - v).abs();
            if d > worst.0 {
                worst = (d, i);
            }
        }
        // Exact for every format, JPEG included: it goes through libjpeg-turbo's decoder as in
        // PIL (zune-jpeg's chroma upsampling moved a quarter of a photo's pixels by 1-4 levels,
        // enough to reorder a top-5).
        let tolerance = 1e-5;
        assert!(
            worst.0 < tolerance,
            "{file}: pixel value {} differs by {} (transformers' level {}, ours {})",
            worst.1,
            worst.0,
            want[worst.1],
            (patches.values[worst.1] + 1.0) * 127.5
        );
        for (i, w) in case["pixel_head"].as_array().unwrap().iter().enumerate() {
            let w = w.as_f64().unwrap() as f32;
            assert!(
                (w - patches.values[i]).abs() <= tolerance,
                "{file}: value {i}"
            );
        }
    }
}

#[test]
fn bad_images_are_refused_with_a_reason() {
    let limits = DecodeLimits::default();
    let bad = |name: &str| decode(&image(&format!("bad/{name}")), &limits).unwrap_err();
    assert!(
        matches!(bad("truncated.png"), ImageError::Corrupt(_)),
        "{}",
        bad("truncated.png")
    );
    assert!(matches!(
        bad("random.png"),
        ImageError::UnsupportedFormat(_)
    ));
    let bomb = bad("bomb.png");
    assert!(
        matches!(
            bomb,
            ImageError::TooLarge {
                width: 100_000,
                height: 100_000,
                ..
            }
        ),
        "{bomb}"
    );
    assert!(bomb.to_string().contains("100000x100000"), "{bomb}");
    for name in ["image.bmp", "image.tiff"] {
        let e = bad(name);
        assert!(matches!(e, ImageError::UnsupportedFormat(_)), "{name}: {e}");
        assert!(e.to_string().contains("PNG, JPEG, WebP or GIF"), "{e}");
    }
}
