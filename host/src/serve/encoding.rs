//! A request body's content coding (`Content-Encoding`): `gzip` and `deflate` are decoded, as
//! Triton's HTTP front door does, within the body limit applied to the decoded bytes (a small
//! compressed body must not become gigabytes in memory); any other coding is refused by name
//! rather than read as JSON and reported as "not JSON".

use std::io::Read;

use axum::http::header::CONTENT_ENCODING;
use axum::http::HeaderMap;

/// One content coding this server decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    /// RFC 1952, several members allowed.
    Gzip,
    /// HTTP's `deflate`: the zlib format (RFC 1950).
    Deflate,
}

/// Why a body could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// A coding this server does not decode.
    #[error(
        "Content-Encoding `{0}` is not supported: send the body as gzip, deflate or uncompressed"
    )]
    Unsupported(String),
    /// The bytes are not in the coding they claim.
    #[error("the request body is not valid {coding} (Content-Encoding): {reason}")]
    Corrupt {
        /// The coding's name.
        coding: &'static str,
        /// What the decoder said.
        reason: String,
    },
    /// Decoded, it passes the limit.
    #[error("the request body decompresses to more than the server's limit of {0} bytes (server.max_body_size)")]
    TooLarge(usize),
}

impl Coding {
    fn name(self) -> &'static str {
        match self {
            Coding::Gzip => "gzip",
            Coding::Deflate => "deflate",
        }
    }
}

/// The codings `headers` say were applied, in the order they were applied (`identity` left out).
pub fn codings(headers: &HeaderMap) -> Result<Vec<Coding>, DecodeError> {
    let mut out = Vec::new();
    for value in headers.get_all(CONTENT_ENCODING) {
        let text = value.to_str().map_err(|_| {
            DecodeError::Unsupported(String::from_utf8_lossy(value.as_bytes()).into())
        })?;
        for token in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            match token.to_ascii_lowercase().as_str() {
                "identity" => {}
                "gzip" | "x-gzip" => out.push(Coding::Gzip),
                "deflate" => out.push(Coding::Deflate),
                _ => return Err(DecodeError::Unsupported(token.to_string())),
            }
        }
    }
    Ok(out)
}

/// `bytes` with `codings` undone (the last applied first), each step at most `limit` bytes.
pub fn decode(
    mut bytes: Vec<u8>,
    codings: &[Coding],
    limit: usize,
) -> Result<Vec<u8>, DecodeError> {
    for &coding in codings.iter().rev() {
        let reader: Box<dyn Read + '_> = match coding {
            Coding::Gzip => Box::new(flate2::read::MultiGzDecoder::new(bytes.as_slice())),
            Coding::Deflate => Box::new(flate2::read::ZlibDecoder::new(bytes.as_slice())),
        };
        let mut out = Vec::new();
        let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
        reader
            .take(cap)
            .read_to_end(&mut out)
            .map_err(|e| DecodeError::Corrupt {
                coding: coding.name(),
                reason: e.to_string(),
            })?;
        if out.len() > limit {
            return Err(DecodeError::TooLarge(limit));
        }
        bytes = out;
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    fn deflate(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(CONTENT_ENCODING, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn codings_are_read_in_order_across_header_lines_and_identity_is_nothing() {
        assert_eq!(codings(&headers(&[])).unwrap(), []);
        assert_eq!(codings(&headers(&["identity"])).unwrap(), []);
        assert_eq!(
            codings(&headers(&["deflate, GZIP", "x-gzip"])).unwrap(),
            [Coding::Deflate, Coding::Gzip, Coding::Gzip]
        );
        assert_eq!(
            codings(&headers(&["gzip, br"])),
            Err(DecodeError::Unsupported("br".into()))
        );
    }

    #[test]
    fn gzip_and_deflate_are_undone_last_first() {
        let text = b"{\"model\": \"echo\", \"prompt\": \"hi\"}".repeat(50);
        assert_eq!(decode(gzip(&text), &[Coding::Gzip], 1 << 20).unwrap(), text);
        assert_eq!(
            decode(deflate(&text), &[Coding::Deflate], 1 << 20).unwrap(),
            text
        );
        let both = gzip(&deflate(&text));
        assert_eq!(
            decode(both, &[Coding::Deflate, Coding::Gzip], 1 << 20).unwrap(),
            text
        );
        // Concatenated gzip members are one body (RFC 1952).
        let mut members = gzip(&text[..100]);
        members.extend(gzip(&text[100..]));
        assert_eq!(decode(members, &[Coding::Gzip], 1 << 20).unwrap(), text);
    }

    #[test]
    fn the_limit_holds_for_the_decoded_bytes_and_corrupt_bytes_are_named() {
        let bomb = gzip(&vec![b' '; 10 << 20]);
        assert!(bomb.len() < 64 << 10);
        assert_eq!(
            decode(bomb, &[Coding::Gzip], 1 << 20),
            Err(DecodeError::TooLarge(1 << 20))
        );
        let exact = vec![b'x'; 1000];
        assert_eq!(decode(gzip(&exact), &[Coding::Gzip], 1000).unwrap(), exact);
        let err = decode(b"{\"not\": \"gzip\"}".to_vec(), &[Coding::Gzip], 1 << 20).unwrap_err();
        assert!(
            matches!(&err, DecodeError::Corrupt { coding: "gzip", .. }),
            "{err}"
        );
        assert!(err.to_string().contains("not valid gzip"), "{err}");
    }
}
