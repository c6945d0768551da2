//! A string that never shows itself in `Debug` or `Display` output, zeroed when dropped.

use std::fmt;

use zeroize::Zeroize;

/// A secret value (password, private key PEM). Its `Debug` and `Display` print `***`; its bytes
/// are overwritten with zeros when it is dropped (copies handed to other libraries, such as
/// rskafka's and rsasl's credentials, are theirs and are not).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// Shortens the value to `len` bytes (a char boundary), zeroing what is cut off.
    pub fn truncate(&mut self, len: usize) {
        if len < self.0.len() {
            // SAFETY: the bytes past `len` are zeroed, then cut; `len` is a char boundary
            // (checked), so what stays is valid UTF-8.
            assert!(self.0.is_char_boundary(len));
            unsafe { self.0.as_mut_vec()[len..].zeroize() };
            self.0.truncate(len);
        }
    }

    /// The secret itself; call only where it is used, never to log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Self(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_printed() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?}"), "*** ***");
        assert_eq!(s.expose(), "hunter2");
    }
}
