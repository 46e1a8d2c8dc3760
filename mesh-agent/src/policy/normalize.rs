//! Request path normalisation before `paths` / `notPaths` matching.
//!
//! Mirrors what Istio configures Envoy to do (`normalize_path` +
//! `merge_slashes`, escaped slashes rejected) so that a DENY rule on
//! `/admin` cannot be bypassed by another spelling of the same path:
//!
//! 1. The query (`?...`) and fragment (`#...`) are dropped: Istio matches
//!    paths without the query.
//! 2. `*` (the asterisk-form of `OPTIONS *`) is returned unchanged; any other
//!    path must start with `/` (absolute-form targets must be converted by
//!    the caller).
//! 3. Raw backslashes, control characters, spaces and non-ASCII bytes are
//!    rejected (they are not valid in a request target, and backends disagree
//!    about what `\` means).
//! 4. Percent-encodings: `%2F` and `%5C` (any case) are rejected (Envoy's
//!    `REJECT_REQUEST` choice: an encoded slash is either a bypass attempt or
//!    a path we cannot match safely); unreserved characters
//!    (`A-Z a-z 0-9 - . _ ~`) are decoded; every other encoding is kept with
//!    uppercase hex digits. A malformed `%` escape is rejected.
//! 5. `.` and `..` segments are removed (RFC 3986 `remove_dot_segments`,
//!    never above the root) and runs of `/` are merged into one.
//!
//! Not done, by design (as in Istio): case folding (`/ADMIN` is a different
//! path), trailing-slash removal (`/admin/` differs from `/admin`), `;`
//! parameter stripping, and decoding twice (`%252e` stays `%252E`).

/// Why a path was rejected; the agent answers 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("empty path")]
    Empty,
    #[error("path does not start with '/'")]
    MissingLeadingSlash,
    #[error("path contains an encoded slash or backslash (%2F or %5C)")]
    EncodedSlash,
    #[error("path contains a backslash")]
    Backslash,
    #[error("path contains a control character, space or non-ASCII byte")]
    InvalidCharacter,
    #[error("path contains a malformed percent-encoding")]
    BadPercentEncoding,
}

/// Normalises a request path (see the module documentation).
pub fn normalize_path(raw: &str) -> Result<String, PathError> {
    let end = raw.find(['?', '#']).unwrap_or(raw.len());
    let path = &raw[..end];
    if path.is_empty() {
        return Err(if raw.is_empty() {
            PathError::Empty
        } else {
            PathError::MissingLeadingSlash
        });
    }
    if path == "*" {
        return Ok("*".to_owned());
    }
    if !path.starts_with('/') {
        return Err(PathError::MissingLeadingSlash);
    }
    let decoded = canonical_escapes(path)?;
    Ok(remove_dot_segments(&decoded))
}

/// Step 3 and 4: character checks and percent-encoding canonicalisation.
pub(crate) fn canonical_escapes(path: &str) -> Result<String, PathError> {
    let b = path.as_bytes();
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let (Some(hi), Some(lo)) = (
                    b.get(i + 1).and_then(|c| hex(*c)),
                    b.get(i + 2).and_then(|c| hex(*c)),
                ) else {
                    return Err(PathError::BadPercentEncoding);
                };
                let v = hi << 4 | lo;
                match v {
                    b'/' | b'\\' => return Err(PathError::EncodedSlash),
                    c if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') => {
                        out.push(char::from(c))
                    }
                    c => {
                        const HEX: &[u8; 16] = b"0123456789ABCDEF";
                        out.push('%');
                        out.push(char::from(HEX[usize::from(c >> 4)]));
                        out.push(char::from(HEX[usize::from(c & 0xf)]));
                    }
                }
                i += 3;
            }
            b'\\' => return Err(PathError::Backslash),
            c if c <= b' ' || c >= 0x7f => return Err(PathError::InvalidCharacter),
            c => {
                out.push(char::from(c));
                i += 1;
            }
        }
    }
    Ok(out)
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Step 5 on a path starting with `/`.
fn remove_dot_segments(path: &str) -> String {
    let mut segs: Vec<&str> = Vec::new();
    // A trailing '/' (or a final dot segment, which names a directory) is kept.
    let mut trailing = false;
    for seg in path[1..].split('/') {
        trailing = false;
        match seg {
            "" => trailing = true,
            "." => trailing = true,
            ".." => {
                segs.pop();
                trailing = true;
            }
            s => segs.push(s),
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &segs {
        out.push('/');
        out.push_str(s);
    }
    if trailing || segs.is_empty() {
        out.push('/');
    }
    out
}
