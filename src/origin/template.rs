//! What the HTTP origins share: URL templates and `Content-MD5`.

use crate::checksum::Checksum;
use crate::error::{Error, Result};
use crate::id::ImageId;

/// Checks an origin's URL template: `http(s)://` with an `{id}`.
pub(crate) fn check_template(template: String) -> Result<String> {
    if !template.contains("{id}") {
        return Err(Error::Config(format!(
            "origin URL {template:?} has no {{id}} placeholder"
        )));
    }
    if !(template.starts_with("http://") || template.starts_with("https://")) {
        return Err(Error::Config(format!(
            "origin URL {template:?} is not http:// or https://"
        )));
    }
    Ok(template)
}

/// The URL of image `id` in `template`.
pub(crate) fn url_of(template: &str, id: &ImageId) -> String {
    template.replace("{id}", &percent_encode(id.as_str()))
}

/// Percent-encodes everything but RFC 3986's unreserved characters, so that
/// an id is one path segment.
pub(crate) fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Reads a `Content-MD5` value: 32 hex digits (Glance), or the base64 of
/// the 16-byte digest (RFC 1864).
pub(crate) fn content_md5(value: &str) -> Option<Checksum> {
    let v = value.trim();
    if let Ok(c) = Checksum::md5(v) {
        return Some(c);
    }
    let digest = base64_16(v)?;
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    Checksum::md5(&hex).ok()
}

/// Decodes standard base64 holding exactly 16 bytes (24 characters, `==`).
fn base64_16(s: &str) -> Option<[u8; 16]> {
    let s = s.strip_suffix("==")?;
    if s.len() != 22 {
        return None;
    }
    let mut bits: u32 = 0;
    let mut nbits = 0;
    let mut out = Vec::with_capacity(16);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        bits = (bits << 6) | u32::from(v);
        nbits += 6;
        if nbits >= 8 {
            nbits -= 8;
            out.push((bits >> nbits) as u8);
            bits &= (1 << nbits) - 1;
        }
    }
    out.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_md5_in_hex_and_base64() {
        let hex = "900150983cd24fb0d6963f7d28e17f72"; // MD5 of "abc"
        assert_eq!(content_md5(hex).unwrap().hex(), hex);
        assert_eq!(content_md5("kAFQmDzST7DWlj99KOF/cg==").unwrap().hex(), hex);
        assert!(content_md5("nonsense").is_none());
        assert!(content_md5("kAFQmDzST7DWlj99KOF/c!==").is_none());
    }
}
