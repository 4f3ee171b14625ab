//! [`HttpOrigin`]: images fetched over HTTP(S) with a blocking client.

use std::time::Duration;

use super::template::{check_template, content_md5, url_of};
use super::{Origin, OriginObject, OriginRequest};
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
/// - [`Origin::open_for`] passes the client's `X-Auth-Token` on.
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
        let template = check_template(template.into())?;
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
        url_of(&self.template, id)
    }
}

impl Origin for HttpOrigin {
    fn open(&self, id: &ImageId) -> Result<OriginObject> {
        self.open_for(id, &OriginRequest::default())
    }

    /// Opens `id`, passing the request's `X-Auth-Token` on.
    fn open_for(&self, id: &ImageId, request: &OriginRequest) -> Result<OriginObject> {
        let url = self.url(id);
        let fail = |detail: String| Error::Origin {
            id: id.clone(),
            origin: url.clone(),
            detail,
        };
        let mut get = self.agent.get(&url);
        if let Some(token) = &request.auth_token {
            get = get.header("X-Auth-Token", token);
        }
        let response = get.call().map_err(|e| fail(e.to_string()))?;
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

    fn authorize(&self, id: &ImageId, request: &OriginRequest) -> Result<super::Access> {
        let url = self.url(id);
        let mut head = self.agent.head(&url);
        if let Some(token) = &request.auth_token {
            head = head.header("X-Auth-Token", token);
        }
        let response = head.call().map_err(|e| Error::Origin {
            id: id.clone(),
            origin: url.clone(),
            detail: format!("authorizing: {e}"),
        })?;
        super::access_of(response.status().as_u16(), id, &url)
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
}
