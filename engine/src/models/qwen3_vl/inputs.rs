//! A prompt with images made into the text model's inputs: each image's placeholder expanded to
//! its merged tokens, their embeddings and DeepStack features spliced in, every token's
//! (temporal, height, width) position as transformers' `get_rope_index` computes it, and cache
//! keys that tell images apart by content.

use std::hash::{Hash, Hasher};

use crate::batch::Splice;
use crate::generate::Media;

/// One image's part of a prompt.
#[derive(Debug, Clone)]
pub struct ImageInput {
    /// `(t, h, w)` in merged tokens.
    pub grid: [usize; 3],
    /// What the vision tower made of it.
    pub encoded: super::Encoded,
    /// A hash of the pixels the tower saw.
    pub content: u64,
}

/// Positions of `ids` (with every image's placeholders already expanded, `grids` in merged
/// tokens and in prompt order) and the delta for the positions after them: text advances one
/// position per token on all three axes; an image's tokens share its first position in time
/// and spread over rows and columns from there; the text after it resumes past its larger side.
pub fn rope_index(ids: &[u32], image_token: u32, grids: &[[usize; 3]]) -> (Vec<[u32; 3]>, i64) {
    let mut positions = Vec::with_capacity(ids.len());
    let (mut next, mut i, mut image) = (0u32, 0usize, 0usize);
    while i < ids.len() {
        match grids.get(image) {
            Some(&[t, h, w]) if ids[i] == image_token => {
                for tt in 0..t {
                    for r in 0..h {
                        for c in 0..w {
                            positions.push([next + tt as u32, next + r as u32, next + c as u32]);
                        }
                    }
                }
                next += h.max(w) as u32;
                i += t * h * w;
                image += 1;
            }
            _ => {
                positions.push([next; 3]);
                next += 1;
                i += 1;
            }
        }
    }
    positions.truncate(ids.len());
    let max = positions
        .iter()
        .flatten()
        .copied()
        .max()
        .map_or(-1, i64::from);
    let delta = max + 1 - ids.len() as i64;
    (positions, delta)
}

/// The prefix-cache key of an image's `k`-th token: outside the vocabulary (top bit set), from
/// the image's content and the token's place in it.
fn cache_key(content: u64, k: usize) -> u32 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (content, k).hash(&mut h);
    0x8000_0000 | (h.finish() as u32 & 0x7fff_ffff)
}

/// Expands each `image_token` of `ids` (one per image, in order) into its image's tokens and
/// gathers what the engine needs beside them.
pub fn expand(ids: &[u32], image_token: u32, images: Vec<ImageInput>) -> (Vec<u32>, Media) {
    let mut prompt = Vec::with_capacity(ids.len());
    let mut keys = Vec::with_capacity(ids.len());
    let mut splices = Vec::with_capacity(images.len());
    let mut grids = Vec::with_capacity(images.len());
    let mut images = images.into_iter();
    for &id in ids {
        let image = (id == image_token).then(|| images.next()).flatten();
        let Some(image) = image else {
            prompt.push(id);
            keys.push(id);
            continue;
        };
        let n = image.grid.iter().product::<usize>();
        splices.push(Splice {
            at: prompt.len(),
            values: image.encoded.embeddings,
            deep: image.encoded.deepstack,
        });
        prompt.extend(std::iter::repeat_n(image_token, n));
        keys.extend((0..n).map(|k| cache_key(image.content, k)));
        grids.push(image.grid);
    }
    let (positions, position_delta) = rope_index(&prompt, image_token, &grids);
    let media = Media {
        splices,
        positions,
        position_delta,
        cache_keys: keys,
    };
    (prompt, media)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_after_an_image_resumes_past_its_larger_side() {
        // <s> <img> x6 (2x3 merged) </s> text: the image starts at position 2.
        let ids = [1, 9, 11, 11, 11, 11, 11, 11, 10, 5];
        let (pos, delta) = rope_index(&ids, 11, &[[1, 2, 3]]);
        assert_eq!(pos[..2], [[0, 0, 0], [1, 1, 1]]);
        assert_eq!(
            pos[2..8],
            [
                [2, 2, 2],
                [2, 2, 3],
                [2, 2, 4],
                [2, 3, 2],
                [2, 3, 3],
                [2, 3, 4]
            ]
        );
        assert_eq!(pos[8..], [[5, 5, 5], [6, 6, 6]]);
        // 7 positions for 10 tokens.
        assert_eq!(delta, -3);
        let (pos, delta) = rope_index(&[4, 5, 6], 11, &[]);
        assert_eq!(pos, [[0; 3], [1; 3], [2; 3]]);
        assert_eq!(delta, 0);
    }

    #[test]
    fn cache_keys_tell_images_apart_and_stay_out_of_the_vocabulary() {
        let (a, b) = (cache_key(1, 0), cache_key(2, 0));
        assert_ne!(a, b);
        assert_eq!(a, cache_key(1, 0));
        assert_ne!(cache_key(1, 0), cache_key(1, 1));
        assert!(a >= 0x8000_0000 && b >= 0x8000_0000);
    }
}
