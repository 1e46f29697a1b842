//! The images a chat's messages carry, decoded within one request's pixel budget.

use pio_plugin_api::wire::Prompt;
use pio_plugin_api::PluginError;

use super::plugin_error;
use crate::images::{data_url_bytes, decode, DecodeLimits, ImageError, RgbImage};
use crate::EngineError;

/// The most pixels one request's images may hold decoded, in all: two of the largest single
/// image (8192 × 8192), ~400 MB of RGB. A request is decoded whole before the model's processor
/// shrinks anything, so without a total a small body of well-compressed images takes gigabytes.
const REQUEST_PIXELS: u64 = 2 * 8192 * 8192;

/// The most images one request may carry. The pixel budget alone does not bound the vision
/// tower's work: the processor enlarges a small image to its minimum size (64 tokens and more),
/// so thousands of 1-pixel images in a few hundred kilobytes were thousands of tower runs.
const REQUEST_IMAGES: usize = 256;

/// The images of a chat's messages, decoded, in the order the chat template meets them (every
/// `image_url` or `image` part); an image that cannot be used names its message and part.
pub(super) fn message_images(prompt: &Prompt) -> Result<MessageImages, PluginError> {
    within(prompt, REQUEST_PIXELS, REQUEST_IMAGES)
}

/// [`message_images`] with at most `total` pixels in all, in at most `most` images.
fn within(prompt: &Prompt, total: u64, most: usize) -> Result<MessageImages, PluginError> {
    let mut images = MessageImages::default();
    let mut left = total;
    let Prompt::Messages(messages) = prompt else {
        return Ok(images);
    };
    for (i, message) in messages.iter().enumerate() {
        let Some(parts) = message.get("content").and_then(|c| c.as_array()) else {
            continue;
        };
        for (j, part) in parts.iter().enumerate() {
            let at = format!("messages[{i}].content[{j}]");
            // Parts as the chat template tells them apart: an image by its type or by an
            // `image`/`image_url` key; else a video by its type or a `video` key.
            let kind = part.get("type").and_then(|t| t.as_str());
            let image = matches!(kind, Some("image" | "image_url"))
                || part.get("image").is_some()
                || part.get("image_url").is_some();
            if !image && (kind == Some("video") || part.get("video").is_some()) {
                // The template would place a video placeholder no video fills.
                return Err(PluginError::invalid_input(format!(
                    "{at}: video input is not supported; send frames as image parts"
                )));
            }
            if !image {
                continue;
            }
            let url = match part.get("image_url") {
                Some(u) => u.get("url").or(Some(u)).and_then(|u| u.as_str()),
                None => part.get("image").and_then(|u| u.as_str()),
            };
            let url = url.ok_or_else(|| {
                PluginError::invalid_input(format!("{at}: an image part without its URL"))
            })?;
            if images.images.len() == most {
                return Err(PluginError::invalid_input(format!(
                    "{at}: a request may carry at most {most} images; send fewer"
                )));
            }
            // Each image is held decoded until the prompt is ready: the headers' sizes are
            // checked against what the request has left before any pixel is decoded.
            let one = DecodeLimits::default().max_pixels;
            let limits = DecodeLimits {
                max_pixels: one.min(left),
            };
            let image = data_url_bytes(url)
                .and_then(|bytes| decode(&bytes, &limits))
                .map_err(|e| match e {
                    ImageError::TooLarge { width, height, .. } if left < one => {
                        PluginError::invalid_input(format!(
                            "{at}: {width} × {height} pixels pass the {total} pixels a request's images may hold in all: send fewer or smaller images"
                        ))
                    }
                    e => PluginError::invalid_input(format!("{at}: {e}")),
                })?;
            left -= u64::from(image.width) * u64::from(image.height);
            images.images.push(image);
            images.places.push(at);
        }
    }
    Ok(images)
}

/// A chat's images, decoded, and the message part each came in (`messages[i].content[j]`).
#[derive(Default)]
#[cfg_attr(test, derive(Debug))]
pub(super) struct MessageImages {
    pub(super) images: Vec<RgbImage>,
    places: Vec<String>,
}

impl MessageImages {
    /// `e` as the client can act on it: an image the model's processor refused (its sides'
    /// ratio, say) is named by the message part it came in.
    pub(super) fn error(&self, e: EngineError) -> PluginError {
        match e {
            EngineError::Image { index, error } if index < self.places.len() => {
                PluginError::invalid_input(format!("{}: {error}", self.places[index]))
            }
            e => plugin_error(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `side` × `side` grey PNG as a data URL.
    fn png(side: u32) -> String {
        use base64::Engine as _;
        let image = image::RgbImage::from_pixel(side, side, image::Rgb([128, 128, 128]));
        let mut bytes = Vec::new();
        image::DynamicImage::ImageRgb8(image)
            .write_to(
                &mut std::io::Cursor::new(&mut bytes),
                image::ImageFormat::Png,
            )
            .unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
        format!("data:image/png;base64,{b64}")
    }

    /// Images and videos are told apart as the chat template does: an image part with no type
    /// is an image (it was skipped, and the template's placeholder had no image), a video part
    /// is refused (its placeholder ran unfilled).
    #[test]
    fn parts_are_read_as_the_template_reads_them() {
        let prompt = |part| {
            Prompt::Messages(vec![
                serde_json::json!({"role": "user", "content": [{"type": "text", "text": "hi"}, part]}),
            ])
        };
        for part in [
            serde_json::json!({"image_url": {"url": png(8)}}),
            serde_json::json!({"image": png(8)}),
            serde_json::json!({"type": "image", "image": png(8)}),
        ] {
            let found = within(&prompt(part.clone()), 1000, 8).map(|i| i.images.len());
            assert_eq!(found.ok(), Some(1), "{part}");
        }
        for part in [
            serde_json::json!({"type": "video", "video": "clip.mp4"}),
            serde_json::json!({"video": ["a.png"]}),
        ] {
            let e = within(&prompt(part.clone()), 1000, 8)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("messages[0].content[1]") && e.contains("video"),
                "{part}: {e}"
            );
        }
    }

    #[test]
    fn a_requests_images_share_one_pixel_budget() {
        let part = |side| serde_json::json!({"type": "image_url", "image_url": {"url": png(side)}});
        let prompt = Prompt::Messages(vec![
            serde_json::json!({"role": "user", "content": [part(8), part(8)]}),
            serde_json::json!({"role": "user", "content": [{"type": "text", "text": "hi"}, part(8)]}),
        ]);
        assert_eq!(
            within(&prompt, 192, 8).map(|i| i.images.len()).ok(),
            Some(3)
        );
        let e = within(&prompt, 191, 8).unwrap_err().to_string();
        assert!(
            e.contains("messages[1].content[1]")
                && e.contains("191 pixels")
                && e.contains("fewer or smaller"),
            "{e}"
        );
        let e = within(&prompt, 100, 8).unwrap_err().to_string();
        assert!(e.contains("messages[0].content[1]"), "{e}");
        let e = within(&prompt, 192, 2).unwrap_err().to_string();
        assert!(
            e.contains("messages[1].content[1]") && e.contains("at most 2 images"),
            "{e}"
        );
    }
}
