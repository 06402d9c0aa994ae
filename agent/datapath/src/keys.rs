//! X25519 keys in WireGuard's text format, and the on-disk private key.
//!
//! We use the x25519 types that boringtun re-exports (`boringtun::x25519`,
//! x25519-dalek 2.x) so that keys pass straight into `noise::Tunn` without
//! conversion or a second, incompatible x25519-dalek in the build.
//!
//! The private key lives in a file on the node (never in the Kubernetes
//! API). It is generated on first start and reused afterwards, so a restart
//! keeps the public key that remote clusters have already accepted. A file
//! that group or others can access is refused rather than silently fixed:
//! the key may already have leaked, and the operator has to decide.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use boringtun::x25519;
use rand_core::{OsRng, RngCore};
use zeroize::Zeroizing;

/// Length of a key in bytes.
pub const KEY_LEN: usize = 32;
/// Length of a key in WireGuard's base64 text form.
pub const KEY_BASE64_LEN: usize = 44;

/// Why a key in text form was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyFormatError {
    /// WireGuard keys are exactly 44 base64 characters (32 bytes, padded).
    #[error("expected {KEY_BASE64_LEN} base64 characters, got {0}")]
    WrongLength(usize),
    /// The text is not valid standard base64.
    #[error("invalid base64: {0}")]
    Base64(#[from] base64::DecodeError),
    /// The file holds bytes that are not text at all.
    #[error("not UTF-8 text")]
    NotText,
    /// Decoded fine but not to 32 bytes (only possible with odd padding).
    #[error("decoded to {0} bytes, expected {KEY_LEN}")]
    WrongDecodedLength(usize),
}

/// Why the private key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// Reading, creating or syncing the file failed.
    #[error("private key file {path}: {source}")]
    Io {
        /// The key file (or its temporary sibling).
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file grants some permission to group or others.
    #[error(
        "private key file {path} has mode {mode:04o}: it must not be accessible by group or \
         others (chmod 600 it if it is known not to have leaked, or delete it to generate a new key)"
    )]
    InsecurePermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Not a regular file (a directory, a device, a FIFO...).
    #[error("private key file {path} is not a regular file")]
    NotRegularFile {
        /// The path.
        path: PathBuf,
    },
    /// The content is not one WireGuard private key.
    #[error("private key file {path} is malformed: {source}")]
    Malformed {
        /// The key file.
        path: PathBuf,
        /// What is wrong with its content.
        source: KeyFormatError,
    },
}

fn decode_key(text: &str) -> Result<Zeroizing<[u8; KEY_LEN]>, KeyFormatError> {
    let text = text.trim();
    if text.len() != KEY_BASE64_LEN {
        return Err(KeyFormatError::WrongLength(text.len()));
    }
    // 44 characters decode to at most 33 bytes; a 33-byte buffer lets the
    // decoder report a wrong length instead of a buffer error.
    let mut buf = Zeroizing::new([0u8; KEY_LEN + 1]);
    let n = BASE64
        .decode_slice(text.as_bytes(), &mut buf[..])
        .map_err(|e| match e {
            base64::DecodeSliceError::DecodeError(e) => KeyFormatError::Base64(e),
            // Cannot happen with 44 characters and 33 bytes of room, but if
            // it did, the text was longer than a key.
            base64::DecodeSliceError::OutputSliceTooSmall => {
                KeyFormatError::WrongLength(text.len())
            }
        })?;
    if n != KEY_LEN {
        return Err(KeyFormatError::WrongDecodedLength(n));
    }
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    key.copy_from_slice(&buf[..KEY_LEN]);
    Ok(key)
}

/// A peer's (or our) X25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; KEY_LEN]);

impl PublicKey {
    /// From raw bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// Raw bytes.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// WireGuard text form (44 characters of base64).
    pub fn to_base64(&self) -> String {
        BASE64.encode(self.0)
    }

    /// Parse WireGuard text form; surrounding whitespace is ignored.
    pub fn from_base64(text: &str) -> Result<Self, KeyFormatError> {
        decode_key(text).map(|k| Self(*k))
    }

    /// The type boringtun wants.
    pub fn to_x25519(&self) -> x25519::PublicKey {
        x25519::PublicKey::from(self.0)
    }
}

impl From<x25519::PublicKey> for PublicKey {
    fn from(k: x25519::PublicKey) -> Self {
        Self(k.to_bytes())
    }
}

impl FromStr for PublicKey {
    type Err = KeyFormatError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_base64(s)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

/// Our X25519 private key. Zeroed on drop (x25519-dalek's `zeroize`), never
/// printed by `Debug`.
#[derive(Clone)]
pub struct PrivateKey(x25519::StaticSecret);

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(public={})", self.public_key())
    }
}

impl PrivateKey {
    /// A fresh key from the operating system's CSPRNG.
    pub fn generate() -> Self {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        OsRng.fill_bytes(&mut bytes[..]);
        Self(x25519::StaticSecret::from(*bytes))
    }

    /// Parse WireGuard text form (as `wg genkey` prints it).
    pub fn from_base64(text: &str) -> Result<Self, KeyFormatError> {
        decode_key(text).map(|k| Self(x25519::StaticSecret::from(*k)))
    }

    /// WireGuard text form, zeroed when dropped.
    pub fn to_base64(&self) -> Zeroizing<String> {
        let bytes = Zeroizing::new(self.0.to_bytes());
        Zeroizing::new(BASE64.encode(&bytes[..]))
    }

    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey::from(x25519::PublicKey::from(&self.0))
    }

    /// The type boringtun wants.
    pub fn to_static_secret(&self) -> x25519::StaticSecret {
        self.0.clone()
    }

    /// Load the key at `path`, refusing a file that group or others can
    /// access, that is not a regular file, or that does not hold exactly one
    /// key (a trailing newline is fine, as `wg genkey > file` writes one).
    pub fn load(path: &Path) -> Result<Self, KeyFileError> {
        let io = |source| KeyFileError::Io {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // Check the opened file, not the path, so a swap between the check
        // and the read cannot slip a different file in.
        let meta = file.metadata().map_err(io)?;
        if !meta.file_type().is_file() {
            return Err(KeyFileError::NotRegularFile {
                path: path.to_owned(),
            });
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyFileError::InsecurePermissions {
                path: path.to_owned(),
                mode,
            });
        }
        // A key file is 45 bytes at most; read a little more so that junk
        // after the key is reported instead of ignored, but never a whole
        // large file into memory.
        let mut text = Zeroizing::new(String::new());
        file.take(256).read_to_string(&mut text).map_err(|e| {
            if e.kind() == std::io::ErrorKind::InvalidData {
                KeyFileError::Malformed {
                    path: path.to_owned(),
                    source: KeyFormatError::NotText,
                }
            } else {
                io(e)
            }
        })?;
        Self::from_base64(&text).map_err(|source| KeyFileError::Malformed {
            path: path.to_owned(),
            source,
        })
    }

    /// Write the key to `path`, which must not exist yet. The file is
    /// created with mode 0600 from the start (never briefly wider), filled
    /// and synced under a temporary name in the same directory, then linked
    /// into place, so a crash leaves either no key file or a complete one,
    /// and a concurrent writer cannot be overwritten (`AlreadyExists`).
    pub fn store_new(&self, path: &Path) -> Result<(), KeyFileError> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let tmp = dir.join(format!(
            ".{}.tmp-{}-{:08x}",
            file_name.as_deref().unwrap_or("key"),
            std::process::id(),
            OsRng.next_u32()
        ));
        let io_at = |p: &Path| {
            let p = p.to_owned();
            move |source| KeyFileError::Io { path: p, source }
        };
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io_at(&tmp))?;
            let mut line = Zeroizing::new(self.to_base64().to_string());
            line.push('\n');
            f.write_all(line.as_bytes()).map_err(io_at(&tmp))?;
            f.sync_all().map_err(io_at(&tmp))?;
            fs::hard_link(&tmp, path).map_err(io_at(path))?;
            Ok(())
        })();
        // The temporary name is gone whether or not the link worked.
        let _ = fs::remove_file(&tmp);
        result?;
        // Make the new directory entry durable.
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io_at(&dir))?;
        Ok(())
    }

    /// Load the key at `path`, or generate and store one if there is none.
    /// Returns the key and whether it was generated now.
    pub fn load_or_generate(path: &Path) -> Result<(Self, bool), KeyFileError> {
        match Self::load(path) {
            Ok(k) => return Ok((k, false)),
            Err(KeyFileError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let key = Self::generate();
        match key.store_new(path) {
            Ok(()) => Ok((key, true)),
            // Someone else created it between our load and our link: use
            // theirs, so both processes agree on one key.
            Err(KeyFileError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::AlreadyExists =>
            {
                Self::load(path).map(|k| (k, false))
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    // The private key of the wg-quick(8) example and its public key, as
    // computed independently with OpenSSL's X25519 (Python `cryptography`).
    const PRIV: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    const PUB: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";

    #[test]
    fn derives_public_key_like_wg_pubkey() {
        let k = PrivateKey::from_base64(PRIV).unwrap();
        assert_eq!(k.public_key().to_base64(), PUB);
        assert_eq!(&*k.to_base64(), PRIV);
    }

    #[test]
    fn public_key_round_trip_and_errors() {
        let k: PublicKey = PUB.parse().unwrap();
        assert_eq!(k.to_string(), PUB);
        assert_eq!(PublicKey::from_base64(&format!(" {PUB}\n")).unwrap(), k);
        assert_eq!(
            PublicKey::from_base64("abc"),
            Err(KeyFormatError::WrongLength(3))
        );
        assert!(matches!(
            PublicKey::from_base64(&"!".repeat(44)),
            Err(KeyFormatError::Base64(_))
        ));
        // 44 characters whose padding says 31 bytes.
        let short = BASE64.encode([7u8; 31]);
        assert_eq!(short.len(), 44);
        assert_eq!(
            PublicKey::from_base64(&short),
            Err(KeyFormatError::WrongDecodedLength(31))
        );
    }

    #[test]
    fn generate_store_load_reuse() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("private.key");
        let (k1, created) = PrivateKey::load_or_generate(&path).unwrap();
        assert!(created);
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.trim_end().len(), KEY_BASE64_LEN);
        assert!(text.ends_with('\n'));
        // A restart loads the same key.
        let (k2, created) = PrivateKey::load_or_generate(&path).unwrap();
        assert!(!created);
        assert_eq!(k1.public_key(), k2.public_key());
        // No temporary files left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        // Two generated keys differ.
        assert_ne!(PrivateKey::generate().public_key(), k1.public_key());
    }

    #[test]
    fn refuses_group_or_other_readable_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        PrivateKey::generate().store_new(&path).unwrap();
        for mode in [0o640, 0o604, 0o660, 0o602] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let err = PrivateKey::load_or_generate(&path).unwrap_err();
            assert!(
                matches!(err, KeyFileError::InsecurePermissions { mode: m, .. } if m == mode),
                "{mode:o}: {err}"
            );
            assert!(err.to_string().contains("must not be accessible"));
        }
        // Refusing did not replace the key.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        assert!(PrivateKey::load(&path).is_ok());
    }

    #[test]
    fn refuses_malformed_file_without_replacing_it() {
        let dir = tempfile::tempdir().unwrap();
        let cases: &[&[u8]] = &[
            b"",
            b"not a key\n",
            b"yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\nyAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\n",
            b"\xff\xfe\xfd",
        ];
        for (i, content) in cases.iter().enumerate() {
            let path = dir.path().join(format!("k{i}"));
            fs::write(&path, content).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
            let err = PrivateKey::load_or_generate(&path).unwrap_err();
            assert!(
                matches!(err, KeyFileError::Malformed { .. }),
                "case {i}: {err}"
            );
            assert_eq!(fs::read(&path).unwrap(), *content);
        }
    }

    #[test]
    fn refuses_directory_and_reports_missing_parent() {
        let dir = tempfile::tempdir().unwrap();
        let err = PrivateKey::load(dir.path()).unwrap_err();
        // A tempdir is 0700, so the type check is what refuses it.
        assert!(matches!(err, KeyFileError::NotRegularFile { .. }), "{err}");
        let missing = dir.path().join("no/such/dir/key");
        let err = PrivateKey::load_or_generate(&missing).unwrap_err();
        assert!(matches!(err, KeyFileError::Io { .. }), "{err}");
    }

    #[test]
    fn store_new_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let first = PrivateKey::generate();
        first.store_new(&path).unwrap();
        let err = PrivateKey::generate().store_new(&path).unwrap_err();
        assert!(
            matches!(&err, KeyFileError::Io { source, .. } if source.kind() == std::io::ErrorKind::AlreadyExists),
            "{err}"
        );
        assert_eq!(
            PrivateKey::load(&path).unwrap().public_key(),
            first.public_key()
        );
    }
}
