//! Admin authentication: a bearer token kept in a 0600 file, created on first start.

use rand::RngCore;
use std::io::Write;
use std::path::Path;
use tonic::{Request, Status};

/// Reads the token file, creating it (mode 0600, 32 random bytes hex) if it does not exist.
pub fn load_or_create_token(path: &Path) -> std::io::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
        Ok(_) => {
            return Err(std::io::Error::other(format!(
                "admin token file {} is empty: delete it to get a new token",
                path.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut raw = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut raw);
    let token = hex::encode(raw);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(token.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    Ok(token)
}

/// tonic interceptor: accepts `authorization: Bearer <token>` only.
#[derive(Clone)]
pub struct AdminAuth {
    token: std::sync::Arc<str>,
}

impl AdminAuth {
    pub fn new(token: String) -> Self {
        AdminAuth {
            token: token.into(),
        }
    }

    pub fn check<T>(&self, req: Request<T>) -> Result<Request<T>, Status> {
        let Some(v) = req.metadata().get("authorization") else {
            return Err(Status::unauthenticated(
                "missing `authorization: Bearer <token>` metadata (the token is in the server's admin token file)",
            ));
        };
        let given = v
            .to_str()
            .ok()
            .and_then(|s| s.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                Status::unauthenticated("authorization metadata must be `Bearer <token>`")
            })?;
        if constant_time_eq(given.as_bytes(), self.token.as_bytes()) {
            Ok(req)
        } else {
            Err(Status::permission_denied("wrong admin token"))
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_is_created_once_with_0600() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/admin.token");
        let t1 = load_or_create_token(&p).unwrap();
        let t2 = load_or_create_token(&p).unwrap();
        assert_eq!(t1, t2);
        assert_eq!(t1.len(), 64);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
    }

    #[test]
    fn interceptor_distinguishes_missing_and_wrong_tokens() {
        let auth = AdminAuth::new("secret".into());
        let mut ok = Request::new(());
        ok.metadata_mut()
            .insert("authorization", "Bearer secret".parse().unwrap());
        assert!(auth.check(ok).is_ok());
        let none = auth.check(Request::new(())).unwrap_err();
        assert_eq!(none.code(), tonic::Code::Unauthenticated);
        let mut wrong = Request::new(());
        wrong
            .metadata_mut()
            .insert("authorization", "Bearer nope".parse().unwrap());
        assert_eq!(
            auth.check(wrong).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
    }
}
