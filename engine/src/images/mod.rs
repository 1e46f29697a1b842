//! Images as vision models take them: decoded from the bytes a user sent (PNG, JPEG, WebP, GIF),
//! turned upright by their EXIF orientation and into 8-bit RGB exactly as transformers' `load_image`
//! and `convert_to_rgb` do with PIL, and resized with PIL's antialiased bicubic filter. Decoding
//! runs in the confined worker, never in the daemon: image decoders are a classic attack surface.

mod decode;
mod resize;

pub use decode::{decode, DecodeLimits};
pub use resize::resize_bicubic;

/// An upright 8-bit RGB image, rows top to bottom, pixels `[r, g, b]` left to right.
#[derive(Clone, PartialEq, Eq)]
pub struct RgbImage {
    /// Columns.
    pub width: u32,
    /// Rows.
    pub height: u32,
    /// `height * width * 3` bytes.
    pub pixels: Vec<u8>,
}

impl std::fmt::Debug for RgbImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RgbImage({}x{})", self.width, self.height)
    }
}

/// Why an image was refused: each names what was wrong and what to send instead.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    /// Not one of the formats decoded here.
    #[error("unsupported image format ({0}); send PNG, JPEG, WebP or GIF")]
    UnsupportedFormat(String),
    /// The bytes are not a valid image of their format (corrupt or truncated).
    #[error("the image could not be decoded ({0}); the file is corrupt or truncated")]
    Corrupt(String),
    /// Its header declares more pixels than the limit (a decompression bomb, or just too big).
    #[error("the image declares {width}x{height} pixels, more than the {limit} pixels accepted; send a smaller image")]
    TooLarge {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// The most pixels accepted.
        limit: u64,
    },
    /// A zero-sized image.
    #[error("the image is empty ({width}x{height} pixels)")]
    Empty {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
    },
    /// An image reference other than inline data.
    #[error("{0}")]
    Reference(String),
    /// Sides too unequal for the model's processor.
    #[error(
        "the image is {width}x{height}: its sides' ratio is more than {limit}; crop or pad it"
    )]
    AspectRatio {
        /// Width.
        width: u32,
        /// Height.
        height: u32,
        /// The largest ratio accepted.
        limit: u32,
    },
}

impl From<ImageError> for crate::EngineError {
    fn from(e: ImageError) -> Self {
        crate::EngineError::InvalidInput(e.to_string())
    }
}

/// The bytes of a `data:image/...;base64,` URL: the only image reference a worker accepts (the
/// daemon reads files under its image root into data URLs; nothing fetches remote URLs).
pub fn data_url_bytes(url: &str) -> Result<Vec<u8>, ImageError> {
    use base64::Engine as _;
    let Some(rest) = url.strip_prefix("data:") else {
        let kind = if url.starts_with("http://") || url.starts_with("https://") {
            "a remote URL (never fetched)"
        } else {
            "not a data: URL"
        };
        return Err(ImageError::Reference(format!(
            "the image is {kind}; send it as a base64 data URL (data:image/png;base64,...)"
        )));
    };
    let Some((meta, data)) = rest.split_once(',') else {
        return Err(ImageError::Reference(
            "the image data URL has no `,` before its data".into(),
        ));
    };
    if !meta.ends_with(";base64") {
        return Err(ImageError::Reference(
            "the image data URL must be base64 (data:image/png;base64,...)".into(),
        ));
    }
    base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| ImageError::Reference(format!("the image data URL is not valid base64: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_urls_only() {
        assert_eq!(data_url_bytes("data:image/png;base64,aGk=").unwrap(), b"hi");
        let e = data_url_bytes("https://example.com/cat.png").unwrap_err();
        assert!(e.to_string().contains("never fetched"), "{e}");
        let e = data_url_bytes("/etc/passwd").unwrap_err();
        assert!(e.to_string().contains("not a data: URL"), "{e}");
        let e = data_url_bytes("data:image/png,raw").unwrap_err();
        assert!(e.to_string().contains("base64"), "{e}");
        let e = data_url_bytes("data:image/png;base64,%%%").unwrap_err();
        assert!(e.to_string().contains("not valid base64"), "{e}");
    }
}
