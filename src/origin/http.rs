//! [`HttpOrigin`]: images fetched over HTTP(S) with a blocking client.

use std::time::Duration;

use super::{Origin, OriginObject};
use crate::checksum::Checksum;
use crate::error::{Error, Result};
use crate::id::ImageId;

/// Fetches image `id` from a URL template in which `{id}` stands for the
/// id, e.g. Glance's `http://glance:9292/v2/images/{id}/file`.
///
/// - A `Content-MD5` header is taken as the expected checksum (Glance sends
///   the image's MD5 in hex; RFC 1864's base64 form is read too).
/// - `Content-Length` is the size.
/// - HTTP 404 is [`Error::OriginNotFound`]; other non-2xx statuses,
///   connection failures and timeouts are [`Error::Origin`].
/// - Bodies are passed as sent: no content decoding.
#[derive(Debug, Clone)]
pub struct HttpOrigin {
    template: String,
    agent: ureq::Agent,
}

/// Default time to establish a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time allowed for the response headers, and between body reads.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);

impl HttpOrigin {
    /// An origin for `template` with the default timeouts.
    pub fn new(template: impl Into<String>) -> Result<Self> {
        Self::with_timeouts(template, CONNECT_TIMEOUT, READ_TIMEOUT)
    }

    /// An origin for `template` with these timeouts.
    pub fn with_timeouts(
        template: impl Into<String>,
        connect: Duration,
        read: Duration,
    ) -> Result<Self> {
        let template = template.into();
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
        let agent = ureq::Agent::config_builder()
            .timeout_connect(Some(connect))
            .timeout_recv_response(Some(read))
            .timeout_recv_body(None)
            .http_status_as_error(false)
            .build()
            .into();
        Ok(HttpOrigin { template, agent })
    }

    /// The URL of image `id`.
    pub fn url(&self, id: &ImageId) -> String {
        self.template.replace("{id}", &percent_encode(id.as_str()))
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters, so that
/// an id is one path segment.
fn percent_encode(s: &str) -> String {
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
fn content_md5(value: &str) -> Option<Checksum> {
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

impl Origin for HttpOrigin {
    fn open(&self, id: &ImageId) -> Result<OriginObject> {
        let url = self.url(id);
        let fail = |detail: String| Error::Origin {
            id: id.clone(),
            origin: url.clone(),
            detail,
        };
        let response = self
            .agent
            .get(&url)
            .call()
            .map_err(|e| fail(e.to_string()))?;
        let status = response.status();
        if status.as_u16() == 404 {
            return Err(Error::OriginNotFound {
                id: id.clone(),
                origin: url,
            });
        }
        if !status.is_success() {
            return Err(fail(format!("HTTP {status}")));
        }
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let size = header("content-length").and_then(|v| v.trim().parse().ok());
        let checksum = match header("content-md5") {
            Some(v) => Some(content_md5(&v).ok_or_else(|| fail(format!("bad Content-MD5 {v:?}")))?),
            None => None,
        };
        Ok(OriginObject {
            reader: Box::new(response.into_body().into_reader()),
            size,
            checksum,
        })
    }

    fn describe(&self) -> String {
        self.template.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_encode_the_id_as_one_segment() {
        let o = HttpOrigin::new("http://glance:9292/v2/images/{id}/file").unwrap();
        let id = ImageId::new("a b?#%").unwrap();
        assert_eq!(
            o.url(&id),
            "http://glance:9292/v2/images/a%20b%3F%23%25/file"
        );
        assert!(HttpOrigin::new("http://glance/no-placeholder").is_err());
        assert!(HttpOrigin::new("ftp://x/{id}").is_err());
    }

    #[test]
    fn content_md5_in_hex_and_base64() {
        let hex = "900150983cd24fb0d6963f7d28e17f72"; // MD5 of "abc"
        assert_eq!(content_md5(hex).unwrap().hex(), hex);
        assert_eq!(content_md5("kAFQmDzST7DWlj99KOF/cg==").unwrap().hex(), hex);
        assert!(content_md5("nonsense").is_none());
        assert!(content_md5("kAFQmDzST7DWlj99KOF/c!==").is_none());
    }
}
