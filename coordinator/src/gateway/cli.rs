//! `tpserve gateway`: `hash-key` prints a new API key and the SHA-256 a policy stores for it (or
//! the hash of a key read from standard input); `check` validates a policy file as the server
//! would, naming the field at fault.

use std::io::Read;
use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;

use super::keys::{hash_key, new_key};
use super::Policy;

#[derive(Debug, Subcommand)]
pub enum GatewayCommand {
    /// Print a new random API key and its `sha256:` hash for `key_hashes`. With --stdin, hash the
    /// key read from standard input instead (so it never appears in the shell's history).
    HashKey {
        /// Read the key to hash from standard input (surrounding whitespace is dropped).
        #[arg(long)]
        stdin: bool,
    },
    /// Validate a policy file; exits non-zero with the field at fault.
    Check {
        /// The policy (YAML).
        path: PathBuf,
    },
}

pub fn run(command: GatewayCommand) -> anyhow::Result<()> {
    match command {
        GatewayCommand::HashKey { stdin } => {
            if stdin {
                let mut key = String::new();
                std::io::stdin()
                    .read_to_string(&mut key)
                    .context("reading the key from standard input")?;
                let key = key.trim();
                anyhow::ensure!(!key.is_empty(), "standard input held no key");
                println!("sha256:{}", hash_key(key));
            } else {
                let key = new_key();
                println!("key:  {key}");
                println!("hash: sha256:{}", hash_key(&key));
            }
            Ok(())
        }
        GatewayCommand::Check { path } => {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let policy = Policy::parse(&text).with_context(|| path.display().to_string())?;
            println!(
                "{}: valid, {} tenant(s)",
                path.display(),
                policy.tenants().count()
            );
            Ok(())
        }
    }
}
