//! One certificate authority per cluster, made with the `openssl` CLI: the
//! apiserver's serving certificate, an admin client certificate, the
//! service-account signing key pair, and a token file for agent identities.

use std::fmt::Write as _;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::config::ClusterPlan;
use crate::sys::run;

/// Static bearer tokens the apiserver accepts (`--token-auth-file`).
pub const AGENT_USER: &str = "lab-agent";
pub const AGENT_GROUP: &str = "sdn-tunnel:lab-agents";

#[derive(Debug, Clone)]
pub struct ClusterPki {
    pub dir: PathBuf,
}

const OPENSSL_CNF: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign,digitalSignature
subjectKeyIdentifier = hash
";

impl ClusterPki {
    pub fn ca_crt(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    pub fn server_crt(&self) -> PathBuf {
        self.dir.join("apiserver.crt")
    }
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("apiserver.key")
    }
    pub fn admin_crt(&self) -> PathBuf {
        self.dir.join("admin.crt")
    }
    pub fn admin_key(&self) -> PathBuf {
        self.dir.join("admin.key")
    }
    pub fn sa_key(&self) -> PathBuf {
        self.dir.join("sa.key")
    }
    pub fn sa_pub(&self) -> PathBuf {
        self.dir.join("sa.pub")
    }
    pub fn tokens(&self) -> PathBuf {
        self.dir.join("tokens.csv")
    }
    pub fn agent_token(&self) -> Result<String> {
        let csv = fs::read_to_string(self.tokens())?;
        csv.lines()
            .find(|l| l.split(',').nth(1) == Some(AGENT_USER))
            .and_then(|l| l.split(',').next())
            .map(str::to_string)
            .context("no agent token in tokens.csv")
    }

    /// Creates every key and certificate of a cluster in `dir` (EC P-256: fast
    /// to make, accepted by Go and rustls).
    pub fn create(dir: &Path, cluster: &ClusterPlan) -> Result<Self> {
        fs::create_dir_all(dir)?;
        let pki = Self {
            dir: dir.to_path_buf(),
        };
        let cnf = dir.join("openssl.cnf");
        fs::write(&cnf, OPENSSL_CNF)?;
        let p = |f: PathBuf| f.to_string_lossy().into_owned();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];

        let cnf_s = p(cnf);
        let (ca_key, ca_crt) = (p(dir.join("ca.key")), p(pki.ca_crt()));
        let subj = format!("/CN={}-lab-ca", cluster.name);
        let mut args = vec!["req", "-x509", "-config", &cnf_s, "-extensions", "v3_ca"];
        args.extend_from_slice(&ec);
        args.extend_from_slice(&[
            "-keyout", &ca_key, "-out", &ca_crt, "-days", "30", "-subj", &subj,
        ]);
        run("openssl", &args)?;

        let san = format!(
            "subjectAltName=IP:{},IP:127.0.0.1,IP:{},DNS:kubernetes,DNS:kubernetes.default,\
             DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost",
            cluster.apiserver_ip,
            cluster.kubernetes_service_ip()
        );
        pki.issue(
            &cnf_s,
            &ca_key,
            &ca_crt,
            "/CN=kube-apiserver",
            "serverAuth",
            Some(&san),
            &pki.server_key(),
            &pki.server_crt(),
        )?;
        pki.issue(
            &cnf_s,
            &ca_key,
            &ca_crt,
            "/O=system:masters/CN=lab-admin",
            "clientAuth",
            None,
            &pki.admin_key(),
            &pki.admin_crt(),
        )?;

        run(
            "openssl",
            &[
                "ecparam",
                "-genkey",
                "-name",
                "prime256v1",
                "-noout",
                "-out",
                &p(pki.sa_key()),
            ],
        )?;
        run(
            "openssl",
            &[
                "ec",
                "-in",
                &p(pki.sa_key()),
                "-pubout",
                "-out",
                &p(pki.sa_pub()),
            ],
        )?;

        let mut tokens = String::new();
        let _ = writeln!(
            tokens,
            "{},{AGENT_USER},{AGENT_USER}-uid,\"{AGENT_GROUP}\"",
            random_hex(24)?
        );
        fs::write(pki.tokens(), tokens)?;
        Ok(pki)
    }

    /// Issues a client certificate for `subject` (`/O=group/CN=user`) signed
    /// by the cluster's CA, as `<name>.crt` and `<name>.key`; returns both
    /// paths (certificate, key).
    pub fn issue_client(&self, name: &str, subject: &str) -> Result<(PathBuf, PathBuf)> {
        let p = |f: PathBuf| f.to_string_lossy().into_owned();
        let (crt, key) = (
            self.dir.join(format!("{name}.crt")),
            self.dir.join(format!("{name}.key")),
        );
        self.issue(
            &p(self.dir.join("openssl.cnf")),
            &p(self.dir.join("ca.key")),
            &p(self.ca_crt()),
            subject,
            "clientAuth",
            None,
            &key,
            &crt,
        )?;
        Ok((crt, key))
    }

    #[allow(clippy::too_many_arguments)]
    fn issue(
        &self,
        cnf: &str,
        ca_key: &str,
        ca_crt: &str,
        subject: &str,
        eku: &str,
        san: Option<&str>,
        key: &Path,
        crt: &Path,
    ) -> Result<()> {
        let csr = key.with_extension("csr");
        let (key_s, crt_s, csr_s) = (
            key.to_string_lossy(),
            crt.to_string_lossy(),
            csr.to_string_lossy(),
        );
        let eku = format!("extendedKeyUsage={eku}");
        let mut args = vec![
            "req",
            "-new",
            "-config",
            cnf,
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ];
        args.extend_from_slice(&[
            "-nodes", "-keyout", &key_s, "-out", &csr_s, "-subj", subject,
        ]);
        args.extend_from_slice(&[
            "-addext",
            "keyUsage=critical,digitalSignature,keyEncipherment",
            "-addext",
            &eku,
        ]);
        if let Some(san) = san {
            args.extend_from_slice(&["-addext", san]);
        }
        run("openssl", &args)?;
        run(
            "openssl",
            &[
                "x509",
                "-req",
                "-in",
                &csr_s,
                "-CA",
                ca_crt,
                "-CAkey",
                ca_key,
                "-CAcreateserial",
                "-days",
                "30",
                "-copy_extensions",
                "copyall",
                "-out",
                &crt_s,
            ],
        )?;
        fs::remove_file(&csr)?;
        Ok(())
    }
}

/// `n` random bytes from the kernel, hex-encoded.
pub fn random_hex(n: usize) -> Result<String> {
    let mut buf = vec![0u8; n];
    fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    }))
}
