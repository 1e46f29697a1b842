//! Bytes to an upright RGB image, as transformers 5 loads one it was sent: PIL opens it,
//! `load_image` applies the EXIF orientation and converts to RGB (an alpha channel is dropped,
//! keeping the colours beneath), then the processor's `convert_to_rgb` sees a transparency that
//! survived — a single transparent palette entry or a PNG colour key, carried as a colour — and
//! turns every pixel of exactly that colour white.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader};

use super::{ImageError, RgbImage};

/// How big an image may be before it is refused, checked on the header before any pixel is
/// decoded.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    /// The most pixels (width × height). PIL refuses more than ~179 million; a model's processor
    /// shrinks whatever it gets, so a worker need not spend gigabytes on one picture.
    pub max_pixels: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        // 8192 × 8192: a 64-megapixel photo decodes; a 100000 × 100000 bomb does not.
        Self {
            max_pixels: 8192 * 8192,
        }
    }
}

/// Decodes `bytes` (PNG, JPEG, WebP or GIF's first frame) into upright 8-bit RGB.
pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<RgbImage, ImageError> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Corrupt(e.to_string()))?;
    let format = match reader.format() {
        Some(f @ (ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP | ImageFormat::Gif)) => {
            f
        }
        Some(other) => return Err(ImageError::UnsupportedFormat(format!("{other:?}"))),
        None => {
            return Err(ImageError::UnsupportedFormat(
                "not a recognised image".into(),
            ))
        }
    };
    let mut decoder = reader.into_decoder().map_err(corrupt)?;
    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(ImageError::Empty { width, height });
    }
    if u64::from(width) * u64::from(height) > limits.max_pixels {
        return Err(ImageError::TooLarge {
            width,
            height,
            limit: limits.max_pixels,
        });
    }
    let key = colour_key(format, bytes, limits)?;
    // A broken EXIF block is ignored, as PIL ignores it.
    let orientation = decoder.orientation().ok();
    let mut image = if format == ImageFormat::Jpeg {
        drop(decoder);
        jpeg(bytes)?
    } else {
        DynamicImage::from_decoder(decoder).map_err(corrupt)?
    };
    if let Some(o) = orientation {
        image.apply_orientation(o);
    }
    let mut rgb = to_rgb(image)?;
    if let Some(key) = key {
        whiten(&mut rgb, key.rgb, key.transparent.as_deref());
    }
    Ok(rgb)
}

/// A JPEG's pixels as libjpeg-turbo gives them to PIL: ISLOW IDCT and "fancy" chroma upsampling
/// to RGB, grey as grey, and CMYK through PIL's conversion of Adobe's inverted CMYK.
fn jpeg(bytes: &[u8]) -> Result<DynamicImage, ImageError> {
    use mozjpeg::{ColorSpace, Decompress};
    // libjpeg only warns at a premature end and fills the rest with grey; PIL refuses the file.
    if !jpeg_complete(bytes) {
        return Err(ImageError::Corrupt(
            "the JPEG data ends before its end-of-image marker".into(),
        ));
    }
    // Each scan of a progressive JPEG walks the whole image's coefficients, and nothing stops
    // libjpeg midway: a small file of thousands of scans is minutes of CPU (TurboJPEG's limit).
    let scans = jpeg_scans(bytes);
    if scans > MAX_SCANS {
        return Err(ImageError::Corrupt(format!(
            "the JPEG has {scans} scans, more than the {MAX_SCANS} accepted (a photo has a few dozen at most); re-encode it"
        )));
    }
    let run = || -> std::io::Result<DynamicImage> {
        let d = Decompress::new_mem(bytes)?;
        let size = |w: usize, h: usize| (w as u32, h as u32);
        let image = match d.color_space() {
            ColorSpace::JCS_GRAYSCALE => {
                let mut s = d.grayscale()?;
                let (w, h) = size(s.width(), s.height());
                let px = s.read_scanlines::<u8>()?;
                s.finish()?;
                image::GrayImage::from_raw(w, h, px).map(DynamicImage::ImageLuma8)
            }
            ColorSpace::JCS_CMYK | ColorSpace::JCS_YCCK => {
                let mut s = d.to_colorspace(ColorSpace::JCS_CMYK)?;
                let (w, h) = size(s.width(), s.height());
                let px = s.read_scanlines::<u8>()?;
                s.finish()?;
                let rgb = px.chunks_exact(4).flat_map(adobe_cmyk_to_rgb).collect();
                image::RgbImage::from_raw(w, h, rgb).map(DynamicImage::ImageRgb8)
            }
            _ => {
                let mut s = d.rgb()?;
                let (w, h) = size(s.width(), s.height());
                let px = s.read_scanlines::<u8>()?;
                s.finish()?;
                image::RgbImage::from_raw(w, h, px).map(DynamicImage::ImageRgb8)
            }
        };
        image.ok_or_else(|| {
            std::io::Error::other("the decoder returned fewer pixels than the image has")
        })
    };
    // libjpeg's fatal errors unwind out of the C decoder as panics.
    match std::panic::catch_unwind(run) {
        Ok(Ok(image)) => Ok(image),
        Ok(Err(e)) => Err(ImageError::Corrupt(e.to_string())),
        Err(p) => Err(ImageError::Corrupt(
            p.downcast_ref::<String>()
                .cloned()
                .unwrap_or_else(|| "libjpeg failed".into()),
        )),
    }
}

/// Whether an end-of-image marker follows the last start-of-scan (byte stuffing keeps both
/// marker pairs out of entropy-coded data; an EXIF thumbnail's markers come before the image's).
fn jpeg_complete(bytes: &[u8]) -> bool {
    let marker = |m: u8| move |w: &[u8]| w == [0xFF, m];
    let Some(scan) = bytes.windows(2).rposition(marker(0xDA)) else {
        return false;
    };
    bytes[scan..].windows(2).any(marker(0xD9))
}

/// The most scans a JPEG may have (TurboJPEG's recommended limit).
const MAX_SCANS: usize = 500;

/// How many scans (start-of-scan markers) a JPEG has, walking its segments: marker segments'
/// bytes (an EXIF thumbnail's, a comment's) and entropy-coded data are skipped, so neither
/// counts; a file cut short counts what it holds.
fn jpeg_scans(bytes: &[u8]) -> usize {
    let (mut at, mut scans) = (2, 0);
    while at + 1 < bytes.len() {
        let marker = bytes[at + 1];
        // Fill bytes, `FF 00` (which libjpeg drops as extraneous outside a scan, as any byte
        // that is no marker): step on, one byte, as libjpeg does; a length read there could
        // jump over scans it then decodes.
        if bytes[at] != 0xFF || marker == 0xFF || marker == 0x00 {
            at += 1;
            continue;
        }
        match marker {
            0xD9 => break,
            // Markers without a length: SOI, TEM, the restarts.
            0xD8 | 0x01 | 0xD0..=0xD7 => at += 2,
            _ => {
                let Some(len) = bytes.get(at + 2..at + 4) else {
                    break;
                };
                at += 2 + usize::from(u16::from_be_bytes([len[0], len[1]]));
                if marker == 0xDA {
                    scans += 1;
                    // The entropy-coded data, up to the next marker that is not a stuffed
                    // 0xFF (followed by 0) or a restart.
                    while at + 1 < bytes.len()
                        && !(bytes[at] == 0xFF
                            && bytes[at + 1] != 0
                            && !(0xD0..=0xD7).contains(&bytes[at + 1]))
                    {
                        at += 1;
                    }
                }
            }
        }
    }
    scans
}

/// PIL reads every CMYK JPEG as Adobe's inverted CMYK (`CMYK;I`), then converts to RGB with
/// integer arithmetic: `R = (255 - K) - (C * (255 - K)) / 255`, rounded its way.
fn adobe_cmyk_to_rgb(raw: &[u8]) -> [u8; 3] {
    let muldiv255 = |a: u32, b: u32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    let nk = u32::from(raw[3]);
    let channel = |c: u8| nk.saturating_sub(muldiv255(255 - u32::from(c), nk)) as u8;
    [channel(raw[0]), channel(raw[1]), channel(raw[2])]
}

fn corrupt(e: image::ImageError) -> ImageError {
    match e {
        image::ImageError::Unsupported(u) => ImageError::UnsupportedFormat(u.to_string()),
        other => ImageError::Corrupt(other.to_string()),
    }
}

/// A transparency PIL carries as one colour through `convert("RGB")`.
struct Key {
    rgb: [u8; 3],
    /// Pixels transparent in the source whatever their decoded colour (a GIF's transparent
    /// entry may decode to black), by index into the image's pixels.
    transparent: Option<Vec<bool>>,
}

/// The colour key of a PNG (a `tRNS` colour on RGB or grey, or a palette whose `tRNS` makes
/// exactly one entry transparent and the rest opaque) or of a GIF's first frame.
fn colour_key(
    format: ImageFormat,
    bytes: &[u8],
    limits: &DecodeLimits,
) -> Result<Option<Key>, ImageError> {
    match format {
        ImageFormat::Png => png_key(bytes),
        ImageFormat::Gif => gif_key(bytes, limits),
        _ => Ok(None),
    }
}

fn png_key(bytes: &[u8]) -> Result<Option<Key>, ImageError> {
    let reader = png::Decoder::new(Cursor::new(bytes))
        .read_info()
        .map_err(|e| ImageError::Corrupt(e.to_string()))?;
    let info = reader.info();
    let (Some(trns), false) = (
        info.trns.as_deref(),
        info.bit_depth == png::BitDepth::Sixteen,
    ) else {
        return Ok(None);
    };
    let rgb = match info.color_type {
        // The png crate keeps an 8-bit key as bytes (a 16-bit one as big-endian pairs, refused
        // above).
        png::ColorType::Rgb if trns.len() == 3 => [trns[0], trns[1], trns[2]],
        png::ColorType::Grayscale if !trns.is_empty() => {
            // The key is in the image's bit depth; PIL scales a low-depth grey to 8 bits. A key
            // beyond the depth's range matches no pixel: no key.
            match scale_grey(trns[trns.len() - 1], info.bit_depth) {
                Some(v) => [v; 3],
                None => return Ok(None),
            }
        }
        png::ColorType::Indexed => {
            // PIL keeps a palette transparency as a colour only when it is one fully
            // transparent entry among opaque ones; other alphas are dropped with the band.
            let zeros = trns.iter().filter(|&&a| a == 0).count();
            let simple = zeros == 1 && trns.iter().all(|&a| a == 0 || a == 255);
            let index = trns.iter().position(|&a| a == 0);
            match (simple, index, info.palette.as_deref()) {
                (true, Some(i), Some(p)) if p.len() >= 3 * i + 3 => {
                    [p[3 * i], p[3 * i + 1], p[3 * i + 2]]
                }
                _ => return Ok(None),
            }
        }
        _ => return Ok(None),
    };
    Ok(Some(Key {
        rgb,
        transparent: None,
    }))
}

/// A grey of `depth` bits scaled to 8; `None` when `v` does not fit in `depth` bits.
fn scale_grey(v: u8, depth: png::BitDepth) -> Option<u8> {
    let (max, scale) = match depth {
        png::BitDepth::One => (1, 255),
        png::BitDepth::Two => (3, 85),
        png::BitDepth::Four => (15, 17),
        _ => (255, 1),
    };
    (v <= max).then(|| v * scale)
}

fn gif_key(bytes: &[u8], limits: &DecodeLimits) -> Result<Option<Key>, ImageError> {
    let mut options = gif::DecodeOptions::new();
    options.set_color_output(gif::ColorOutput::Indexed);
    // A byte per pixel, indexed: the crate's own default (50 MB) would call an image inside
    // the limits corrupt.
    if let Some(bytes) = std::num::NonZeroU64::new(limits.max_pixels) {
        options.set_memory_limit(gif::MemoryLimit::Bytes(bytes));
    }
    let mut decoder = options
        .read_info(Cursor::new(bytes))
        .map_err(|e| ImageError::Corrupt(e.to_string()))?;
    let global = decoder.global_palette().map(<[u8]>::to_vec);
    let (w, h) = (decoder.width(), decoder.height());
    let Some(frame) = decoder
        .read_next_frame()
        .map_err(|e| ImageError::Corrupt(e.to_string()))?
    else {
        return Err(ImageError::Corrupt("the GIF has no frames".into()));
    };
    let Some(index) = frame.transparent else {
        return Ok(None);
    };
    let palette = frame.palette.clone().or(global).unwrap_or_default();
    let i = usize::from(index);
    let Some(rgb) = palette.get(3 * i..3 * i + 3) else {
        return Ok(None);
    };
    // Only a first frame covering the whole canvas maps its pixels one to one.
    let whole = frame.left == 0 && frame.top == 0 && frame.width == w && frame.height == h;
    Ok(Some(Key {
        rgb: [rgb[0], rgb[1], rgb[2]],
        transparent: whole.then(|| frame.buffer.iter().map(|&p| p == index).collect()),
    }))
}

/// Every pixel of exactly `key`'s colour (or marked transparent) becomes white, as PIL's
/// `alpha_composite` onto white leaves a fully transparent pixel.
fn whiten(image: &mut RgbImage, key: [u8; 3], transparent: Option<&[bool]>) {
    for (i, px) in image.pixels.chunks_exact_mut(3).enumerate() {
        let marked = transparent.is_some_and(|t| t.get(i).copied().unwrap_or(false));
        if marked || px == key {
            px.copy_from_slice(&[255; 3]);
        }
    }
}

/// PIL's `convert("RGB")` of each decoded layout: alpha dropped, grey replicated.
fn to_rgb(image: DynamicImage) -> Result<RgbImage, ImageError> {
    let (width, height) = (image.width(), image.height());
    let pixels: Vec<u8> = match image {
        DynamicImage::ImageRgb8(b) => b.into_raw(),
        DynamicImage::ImageRgba8(b) => drop_alpha(b.as_raw(), 4, |p| [p[0], p[1], p[2]]),
        DynamicImage::ImageLuma8(b) => b.as_raw().iter().flat_map(|&l| [l; 3]).collect(),
        DynamicImage::ImageLumaA8(b) => drop_alpha(b.as_raw(), 2, |p| [p[0]; 3]),
        // PIL reads 16-bit RGB(A) PNGs at 8 bits by their high bytes, and 16-bit grey as mode
        // I;16, whose conversion to RGB clips at 255.
        DynamicImage::ImageRgb16(b) => b.as_raw().iter().map(|&v| (v >> 8) as u8).collect(),
        DynamicImage::ImageRgba16(b) => b
            .as_raw()
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]].map(|v| (v >> 8) as u8))
            .collect(),
        DynamicImage::ImageLuma16(b) => b
            .as_raw()
            .iter()
            .flat_map(|&v| [v.min(255) as u8; 3])
            .collect(),
        DynamicImage::ImageLumaA16(b) => b
            .as_raw()
            .chunks_exact(2)
            .flat_map(|p| [(p[0] >> 8) as u8; 3])
            .collect(),
        other => {
            return Err(ImageError::UnsupportedFormat(format!(
                "pixel layout {:?}",
                other.color()
            )))
        }
    };
    Ok(RgbImage {
        width,
        height,
        pixels,
    })
}

fn drop_alpha(raw: &[u8], stride: usize, rgb: impl Fn(&[u8]) -> [u8; 3]) -> Vec<u8> {
    raw.chunks_exact(stride).flat_map(rgb).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_truncated_or_corrupt_jpeg_is_refused_not_greyed() {
        let photo = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/images/photo.jpg"
        ))
        .unwrap();
        assert!(decode(&photo, &DecodeLimits::default()).is_ok());
        let e = decode(&photo[..photo.len() / 2], &DecodeLimits::default()).unwrap_err();
        assert!(matches!(e, ImageError::Corrupt(_)), "{e}");
        // A broken header inside: libjpeg's fatal error comes back as an error, not an abort.
        let mut bad = photo.clone();
        let sof = bad.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        bad[sof + 9] = 9; // nine components
        let e = decode(&bad, &DecodeLimits::default()).unwrap_err();
        assert!(
            matches!(e, ImageError::Corrupt(_) | ImageError::UnsupportedFormat(_)),
            "{e}"
        );
        // Straight into libjpeg: a scan before any frame header is its fatal error, which
        // unwinds out of the C decoder into an error.
        let e = jpeg(&[0xFF, 0xD8, 0xFF, 0xDA, 0, 2, 0xFF, 0xD9]).unwrap_err();
        assert!(e.to_string().contains("libjpeg"), "{e}");
    }

    /// Scans are counted by the file's structure: a comment full of start-of-scan byte pairs
    /// does not count, a file of thousands of scans is refused before libjpeg runs.
    #[test]
    fn a_jpeg_of_thousands_of_scans_is_refused() {
        let photo = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/images/photo.jpg"
        ))
        .unwrap();
        let scans = jpeg_scans(&photo);
        assert!((1..=20).contains(&scans), "{scans}");
        // A comment segment right after SOI, holding 0xFF 0xDA pairs.
        let mut commented = photo[..2].to_vec();
        let text: Vec<u8> = [0xFF, 0xDA].repeat(1000);
        commented.extend([0xFF, 0xFE]);
        commented.extend(((text.len() + 2) as u16).to_be_bytes());
        commented.extend(&text);
        commented.extend(&photo[2..]);
        assert_eq!(jpeg_scans(&commented), scans);
        assert!(decode(&commented, &DecodeLimits::default()).is_ok());
        // The last scan repeated until there are more than the limit.
        let last = photo.windows(2).rposition(|w| w == [0xFF, 0xDA]).unwrap();
        let end = photo.len() - 2;
        let mut many = photo[..end].to_vec();
        for _ in 0..MAX_SCANS {
            many.extend(&photo[last..end]);
        }
        many.extend([0xFF, 0xD9]);
        assert_eq!(jpeg_scans(&many), scans + MAX_SCANS);
        // `FF 00` between scans is dropped by libjpeg, not read as a marker with a length that
        // would jump over the scans after it.
        let mut hidden = photo[..end].to_vec();
        for _ in 0..MAX_SCANS {
            hidden.extend([0xFF, 0x00, 0x40, 0x00]);
            hidden.extend(&photo[last..end]);
        }
        hidden.extend([0xFF, 0xD9]);
        assert_eq!(jpeg_scans(&hidden), scans + MAX_SCANS);
        let e = decode(&many, &DecodeLimits::default()).unwrap_err();
        assert!(e.to_string().contains("scans"), "{e}");
    }

    #[test]
    fn a_gif_as_large_as_the_limits_allow_decodes() {
        let side = 8192u16;
        let mut bytes = Vec::new();
        {
            let mut encoder =
                gif::Encoder::new(&mut bytes, side, side, &[9, 9, 9, 200, 0, 0]).unwrap();
            let pixels = vec![1u8; usize::from(side) * usize::from(side)];
            let mut frame = gif::Frame::from_indexed_pixels(side, side, pixels, None);
            frame.transparent = Some(0);
            encoder.write_frame(&frame).unwrap();
        }
        let image = decode(&bytes, &DecodeLimits::default()).unwrap();
        assert_eq!((image.width, image.height), (8192, 8192));
        assert_eq!(&image.pixels[..3], &[200, 0, 0]);
    }

    #[test]
    fn an_empty_image_is_refused_as_empty() {
        // A GIF whose screen and only frame are 0 x 0.
        let mut gif = b"GIF89a\0\0\0\0\0\0\0".to_vec();
        gif.extend_from_slice(b",\0\0\0\0\0\0\0\0\0\x02\x02\x44\x01\0;");
        let e = decode(&gif, &DecodeLimits::default()).unwrap_err();
        assert_eq!(
            e,
            ImageError::Empty {
                width: 0,
                height: 0
            },
            "{e}"
        );
        assert!(e.to_string().contains("empty"), "{e}");
    }

    #[test]
    fn refuses_what_it_does_not_decode() {
        let limits = DecodeLimits::default();
        let e = decode(b"BM\x3e\0\0\0\0\0\0\0", &limits).unwrap_err();
        assert!(matches!(e, ImageError::UnsupportedFormat(_)), "{e}");
        let e = decode(b"hello, not an image", &limits).unwrap_err();
        assert!(e.to_string().contains("PNG, JPEG, WebP or GIF"), "{e}");
    }
}
