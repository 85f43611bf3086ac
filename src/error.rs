//! Answers the proxy makes by itself (SPEC §4): one JSON shape that parses both as Chatwoot's
//! swagger `bad_request_error` (`description` + `errors[]`) and as what the Rails code actually
//! returns (`{"error": "..."}`), so every client library shows a useful message.

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Response, StatusCode};

use crate::body::ResponseBody;

/// A response the proxy produces without a stored body (`X-Cache: LOCAL`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalError {
    /// No token header on a route that needs one.
    MissingToken,
    /// More than one token header, too long, or bytes outside visible ASCII.
    MalformedToken,
    /// The upstream said "Invalid Access Token" for this token recently.
    InvalidToken,
    /// Shed (queue timeout) or breaker open. `retry_after` is whole seconds, at least 1.
    Unavailable { retry_after: u64 },
    /// Over `--rate-limit-per-token` (SPEC 12). `retry_after`: whole seconds until the scope
    /// may make a request again, at least 1.
    RateLimited { retry_after: u64 },
    /// The upstream did not answer within `--upstream-timeout`.
    Timeout,
    /// Connect failure or a malformed upstream response.
    BadGateway,
    /// A request the proxy refuses to forward (e.g. `CONNECT`).
    MethodNotAllowed,
    /// The client's upload stalled (or fell below the minimum rate) and was abandoned.
    RequestTimeout,
}

impl LocalError {
    pub fn status(&self) -> StatusCode {
        match self {
            LocalError::MissingToken | LocalError::MalformedToken | LocalError::InvalidToken => {
                StatusCode::UNAUTHORIZED
            }
            LocalError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            LocalError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            LocalError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            LocalError::BadGateway => StatusCode::BAD_GATEWAY,
            LocalError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            LocalError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
        }
    }

    /// The machine-readable code in `errors[0].code`.
    pub fn code(&self) -> &'static str {
        match self {
            LocalError::MissingToken => "missing_token",
            LocalError::MalformedToken => "malformed_token",
            LocalError::InvalidToken => "invalid_token",
            LocalError::Unavailable { .. } => "upstream_unavailable",
            LocalError::RateLimited { .. } => "rate_limited",
            LocalError::Timeout => "upstream_timeout",
            LocalError::BadGateway => "bad_gateway",
            LocalError::MethodNotAllowed => "method_not_allowed",
            LocalError::RequestTimeout => "request_timeout",
        }
    }

    fn message(&self, token_header: &str) -> String {
        match self {
            LocalError::MissingToken => format!("Missing {token_header} header"),
            LocalError::MalformedToken => format!("Malformed {token_header} header"),
            // Chatwoot's own wording, so clients that match on it keep working.
            LocalError::InvalidToken => "Invalid Access Token".to_string(),
            LocalError::Unavailable { .. } => "Chatwoot is unavailable, retry later".to_string(),
            LocalError::RateLimited { .. } => {
                "Too many requests for this token, retry later".to_string()
            }
            LocalError::Timeout => "Chatwoot did not answer in time".to_string(),
            LocalError::BadGateway => "Chatwoot could not be reached or answered invalidly".into(),
            LocalError::MethodNotAllowed => "Method not supported by the proxy".to_string(),
            LocalError::RequestTimeout => "The request body stopped arriving".to_string(),
        }
    }

    fn field<'a>(&self, token_header: &'a str) -> &'a str {
        match self {
            LocalError::MissingToken
            | LocalError::MalformedToken
            | LocalError::InvalidToken
            | LocalError::RateLimited { .. } => token_header,
            LocalError::MethodNotAllowed => "method",
            LocalError::RequestTimeout => "body",
            _ => "upstream",
        }
    }

    /// The JSON body, e.g.
    /// `{"error":"Missing api_access_token header","description":"...","errors":[{...}]}`.
    pub fn body(&self, token_header: &str) -> Bytes {
        let message = self.message(token_header);
        let body = serde_json::json!({
            "error": message,
            "description": message,
            "errors": [{
                "field": self.field(token_header),
                "message": message,
                "code": self.code(),
            }],
        });
        Bytes::from(body.to_string())
    }

    /// The full response; `X-Cache` and `Date` are added by the caller and hyper.
    pub fn response(&self, token_header: &str) -> Response<ResponseBody> {
        let mut resp = Response::new(ResponseBody::full(self.body(token_header)));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let LocalError::Unavailable { retry_after } | LocalError::RateLimited { retry_after } =
            self
        {
            h.insert(RETRY_AFTER, HeaderValue::from(*retry_after));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_parses_as_both_shapes() {
        let body = LocalError::MissingToken.body("api_access_token");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"], "Missing api_access_token header");
        assert_eq!(v["description"], "Missing api_access_token header");
        assert_eq!(v["errors"][0]["field"], "api_access_token");
        assert_eq!(v["errors"][0]["message"], "Missing api_access_token header");
        assert_eq!(v["errors"][0]["code"], "missing_token");
    }

    #[test]
    fn rate_limited_is_a_429_with_retry_after() {
        let r = LocalError::RateLimited { retry_after: 4 }.response("api_access_token");
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()[RETRY_AFTER], "4");
        let body = LocalError::RateLimited { retry_after: 4 }.body("api_access_token");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["errors"][0]["code"], "rate_limited");
        assert_eq!(v["errors"][0]["field"], "api_access_token");
        assert_eq!(v["error"], v["description"]);
    }

    #[test]
    fn unavailable_carries_retry_after() {
        let r = LocalError::Unavailable { retry_after: 3 }.response("api_access_token");
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()[RETRY_AFTER], "3");
    }
}
