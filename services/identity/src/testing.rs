//! TESTS ONLY (feature `testing`): the real SPIRE of the test platform, for tests that hold SVIDs
//! themselves (the test executable is registered by its path as the workloads it plays) or run a
//! service binary (which serves gRPC over mTLS only and does not start without its SVID).
//!
//! Registration entries are created idempotently and left in place: a binary's entry is the one
//! the runner itself creates when the build directory is the workspace's `target/`, and the runner
//! replaces every other entry of a SecurePay ID at its next start.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use crate::x509::WorkloadIdentity;
use securepay_core::identity::ServiceIdentity;
use securepay_testkit::{component, var};

/// The agent syncs new entries within a few seconds; this bounds the wait for an SVID.
pub const SVID_WAIT: Duration = Duration::from_secs(60);
const AGENT_ID: &str = "spiffe://securepay.dev/node/local-agent";

/// Serializes registrations of this process (two tests must not create the same entry at once).
static REGISTERING: Mutex<()> = Mutex::new(());

pub struct Spire {
    /// The agent's Workload API (`unix:///…/api.sock`): the services' `SPIFFE_ENDPOINT_SOCKET`.
    pub endpoint: String,
    server_socket: String,
    tools_bin: String,
}

impl Spire {
    /// `None` (test skipped) when SPIRE is not configured; a failure under INFRA_REQUIRED.
    pub fn from_env() -> Option<Spire> {
        let agent = component(var::SPIRE_AGENT_SOCKET)?;
        let server_socket = component(var::SPIRE_SERVER_SOCKET)?;
        let tools_bin = component(var::TOOLS_BIN)?;
        Some(Spire { endpoint: format!("unix://{agent}"), server_socket, tools_bin })
    }

    fn cli(&self, args: &[&str]) -> String {
        let bin = PathBuf::from(&self.tools_bin).join("spire-server");
        let out = Command::new(&bin)
            .args(args)
            .arg("-socketPath")
            .arg(&self.server_socket)
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()));
        assert!(
            out.status.success(),
            "spire-server {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Makes sure the executable at `path` (unix:path selector) is issued `workload`'s SVID.
    pub fn ensure_registered(&self, path: &Path, workload: ServiceIdentity) {
        let _one_at_a_time = REGISTERING.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let selector = format!("unix:path:{}", path.display());
        let shown: serde_json::Value = serde_json::from_str(&self.cli(&[
            "entry",
            "show",
            "-spiffeID",
            workload.spiffe_id(),
            "-selector",
            &selector,
            "-output",
            "json",
        ]))
        .unwrap();
        let registered = shown["entries"].as_array().is_some_and(|entries| {
            entries.iter().any(|e| e["parent_id"]["path"].as_str().is_some_and(|p| AGENT_ID.ends_with(p)))
        });
        if !registered {
            self.cli(&[
                "entry",
                "create",
                "-parentID",
                AGENT_ID,
                "-spiffeID",
                workload.spiffe_id(),
                "-selector",
                &selector,
            ]);
        }
    }

    /// THIS test process as `workload` (registered first), waiting for the agent to issue it.
    pub async fn identity_of_this_test(&self, workload: ServiceIdentity) -> WorkloadIdentity {
        self.ensure_registered(&std::env::current_exe().unwrap(), workload);
        WorkloadIdentity::connect(&self.endpoint, workload, SVID_WAIT).await.unwrap_or_else(|e| panic!("{e}"))
    }
}
