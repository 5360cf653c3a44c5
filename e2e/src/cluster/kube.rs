//! kubectl and helm as a user runs them, against one kubeconfig: each call is a process, its
//! failure an error carrying what the command printed. Reading goes through `-o json`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

pub struct Kube {
    kubectl: PathBuf,
    helm: PathBuf,
    kubeconfig: PathBuf,
}

/// What a command printed, for error messages.
fn printed(out: &Output) -> String {
    let mut s = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let o = String::from_utf8_lossy(&out.stdout);
    if !o.trim().is_empty() {
        if !s.is_empty() {
            s.push_str(" | ");
        }
        s.push_str(o.trim());
    }
    s
}

impl Kube {
    pub fn new(kubectl: PathBuf, helm: PathBuf, kubeconfig: PathBuf) -> Self {
        Self {
            kubectl,
            helm,
            kubeconfig,
        }
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    fn command(&self, program: &Path, args: &[&str], stdin: Option<&str>) -> Result<Output> {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        if let Some(input) = stdin
            && let Some(mut pipe) = child.stdin.take()
        {
            pipe.write_all(input.as_bytes())
                .with_context(|| format!("writing to {}", program.display()))?;
        }
        child
            .wait_with_output()
            .with_context(|| format!("waiting for {}", program.display()))
    }

    /// `kubectl ARGS`, whatever its exit status.
    pub fn try_kubectl(&self, args: &[&str], stdin: Option<&str>) -> Result<Output> {
        self.command(&self.kubectl, args, stdin)
    }

    /// `kubectl ARGS`, which must succeed; returns what it printed on stdout.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.kubectl_stdin(args, None)
    }

    pub fn kubectl_stdin(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let out = self.try_kubectl(args, stdin)?;
        if !out.status.success() {
            bail!("kubectl {} failed: {}", args.join(" "), printed(&out));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `helm ARGS`, which must succeed.
    pub fn helm(&self, args: &[&str]) -> Result<String> {
        let out = self.command(&self.helm, args, None)?;
        if !out.status.success() {
            bail!("helm {} failed: {}", args.join(" "), printed(&out));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl apply -f -` of a manifest (YAML or JSON).
    pub fn apply(&self, manifest: &str) -> Result<String> {
        self.kubectl_stdin(&["apply", "-f", "-"], Some(manifest))
    }

    /// `kubectl apply -f -`, expected to be refused: returns what the API server said.
    pub fn apply_refused(&self, manifest: &str) -> Result<String> {
        let out = self.try_kubectl(&["apply", "-f", "-"], Some(manifest))?;
        if out.status.success() {
            bail!("the API server accepted it: {}", printed(&out));
        }
        Ok(printed(&out))
    }

    /// A file parsed into JSON by kubectl itself (client side, nothing sent).
    pub fn read_manifest(&self, path: &Path) -> Result<Value> {
        let p = path.to_string_lossy();
        let text = self.kubectl(&["create", "--dry-run=client", "-o", "json", "-f", &p])?;
        serde_json::from_str(&text).with_context(|| format!("parsing {p} as kubectl printed it"))
    }

    /// One object, or `None` when it does not exist.
    pub fn get(&self, ns: Option<&str>, kind: &str, name: &str) -> Result<Option<Value>> {
        let mut args = vec!["get", kind, name, "-o", "json", "--ignore-not-found"];
        if let Some(ns) = ns {
            args.extend(["-n", ns]);
        }
        let text = self.kubectl(&args)?;
        if text.trim().is_empty() {
            return Ok(None);
        }
        serde_json::from_str(&text)
            .map(Some)
            .with_context(|| format!("parsing {kind}/{name}"))
    }

    /// The items of a list.
    pub fn list(&self, ns: Option<&str>, kind: &str, selector: Option<&str>) -> Result<Vec<Value>> {
        let mut args = vec!["get", kind, "-o", "json"];
        match ns {
            Some(ns) => args.extend(["-n", ns]),
            None => args.push("-A"),
        }
        if let Some(sel) = selector {
            args.extend(["-l", sel]);
        }
        let text = self.kubectl(&args)?;
        let v: Value = serde_json::from_str(&text).with_context(|| format!("parsing {kind}"))?;
        Ok(v["items"].as_array().cloned().unwrap_or_default())
    }
}

/// Polls `f` every 250 ms until it returns `Some`, or fails after `timeout` saying what it
/// waited for and the last thing it saw.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<std::result::Result<T, String>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match f()? {
            Ok(v) => return Ok(v),
            Err(seen) => {
                if Instant::now() >= deadline {
                    bail!("{what}: not within {timeout:?}; last seen: {seen}");
                }
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// `v[a][b]…` as a string, "" when absent.
pub fn s<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    let mut cur = v;
    for p in path {
        cur = &cur[*p];
    }
    cur.as_str().unwrap_or("")
}
