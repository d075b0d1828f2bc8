//! `cleave dns classify`: what the DNS proxy's pin filter says about
//! addresses, for operators checking a policy and for tests.

use std::io::Write;
use std::net::IpAddr;
use std::process::ExitCode;

use anyhow::{anyhow, Context};
use cleave_dnsproxy::pin_filter::{Decision, Nat64Prefix, PinFilter};

/// `cleave dns ...`
#[derive(clap::Subcommand, Debug)]
pub enum DnsCommand {
    /// Print whether the pin filter allows each address, and why not.
    Classify(ClassifyArgs),
}

#[derive(clap::Args, Debug)]
pub struct ClassifyArgs {
    /// An operator NAT64 prefix (RFC 6052 length /32, /40, /48, /56, /64 or
    /// /96); addresses inside it are judged by the IPv4 they carry.
    #[arg(long = "nat64-prefix", value_name = "PREFIX")]
    pub nat64_prefix: Vec<String>,
    /// Block every IPv6 address that carries an IPv4 address.
    #[arg(long)]
    pub strict: bool,
    /// Addresses to classify (IPv4 or IPv6).
    #[arg(value_name = "ADDR", required = true)]
    pub addrs: Vec<String>,
}

/// Runs a `cleave dns` subcommand, printing to stdout.
pub fn run(cmd: DnsCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        DnsCommand::Classify(args) => classify(&args, &mut std::io::stdout().lock()),
    }
}

/// Prints `ADDR allow` or `ADDR block: REASON` per address. Every input is
/// checked before anything is printed; an unparsable address or prefix is an
/// error naming it.
pub fn classify(args: &ClassifyArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let nat64 = args
        .nat64_prefix
        .iter()
        .map(|p| p.parse::<Nat64Prefix>())
        .collect::<Result<Vec<_>, _>>()
        .context("--nat64-prefix")?;
    let addrs = args
        .addrs
        .iter()
        .map(|a| {
            a.trim().parse::<IpAddr>().map_err(|_| {
                anyhow!(
                    "{a:?} is not an IPv4 or IPv6 address (write it like 192.0.2.1 or 2001:db8::1)"
                )
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let filter = PinFilter {
        strict: args.strict,
        nat64,
        allow: Vec::new(),
    };
    for (text, addr) in args.addrs.iter().zip(addrs) {
        match filter.judge(addr) {
            Decision::Allow(_) => writeln!(out, "{} allow", text.trim())?,
            Decision::Block(reason) => writeln!(out, "{} block: {reason}", text.trim())?,
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(nat64: &[&str], strict: bool, addrs: &[&str]) -> ClassifyArgs {
        ClassifyArgs {
            nat64_prefix: nat64.iter().map(|s| s.to_string()).collect(),
            strict,
            addrs: addrs.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn run_to_string(a: &ClassifyArgs) -> anyhow::Result<String> {
        let mut out = Vec::new();
        classify(a, &mut out)?;
        Ok(String::from_utf8(out).unwrap())
    }

    #[test]
    fn metadata_in_nat64_and_6to4_blocked_public_allowed() {
        let out = run_to_string(&args(
            &[],
            false,
            &["64:ff9b::a9fe:a9fe", "2002:a9fe:a9fe::1", "8.8.8.8"],
        ))
        .unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(
            lines[0],
            "64:ff9b::a9fe:a9fe block: NAT64 64:ff9b::/96 carries 169.254.169.254: \
             169.254.0.0/16 link-local (cloud metadata lives here) is not globally reachable \
             (IANA special-purpose registry)"
        );
        assert!(
            lines[1].starts_with("2002:a9fe:a9fe::1 block: 6to4 2002::/16 carries 169.254.169.254"),
            "{}",
            lines[1]
        );
        assert_eq!(lines[2], "8.8.8.8 allow");
    }

    #[test]
    fn nat64_prefix_and_strict_apply() {
        let out = run_to_string(&args(
            &["2001:db8:64::/96"],
            false,
            &["2001:db8:64::a00:1", "2001:db8:64::808:808"],
        ))
        .unwrap();
        assert_eq!(
            out.lines().collect::<Vec<_>>(),
            [
                "2001:db8:64::a00:1 block: operator NAT64 2001:db8:64::/96 carries 10.0.0.1: \
                 10.0.0.0/8 private-use is not globally reachable (IANA special-purpose registry)",
                "2001:db8:64::808:808 allow",
            ]
        );
        let out =
            run_to_string(&args(&[], true, &["64:ff9b::808:808", "2606:4700::1111"])).unwrap();
        assert_eq!(
            out.lines().collect::<Vec<_>>(),
            [
                "64:ff9b::808:808 block: strict mode blocks IPv4 embedded in IPv6 (NAT64 64:ff9b::/96)",
                "2606:4700::1111 allow",
            ]
        );
    }

    #[test]
    fn unparsable_inputs_are_named_and_nothing_is_printed() {
        let mut out = Vec::new();
        let err = classify(&args(&[], false, &["8.8.8.8", "not-an-ip"]), &mut out).unwrap_err();
        assert!(
            format!("{err:#}").contains("\"not-an-ip\" is not an IPv4 or IPv6 address"),
            "{err:#}"
        );
        assert!(out.is_empty());
        let err = classify(&args(&["2001:db8::/33"], false, &["8.8.8.8"]), &mut out).unwrap_err();
        assert!(
            format!("{err:#}")
                .contains("--nat64-prefix: NAT64 prefix 2001:db8::/33 has length /33"),
            "{err:#}"
        );
    }

    #[test]
    fn parses_as_a_clap_subcommand() {
        use clap::Parser;
        #[derive(clap::Parser, Debug)]
        struct T {
            #[command(subcommand)]
            dns: DnsCommand,
        }
        let t = T::try_parse_from([
            "dns",
            "classify",
            "--nat64-prefix",
            "2001:db8:64::/96",
            "--strict",
            "8.8.8.8",
            "::1",
        ])
        .unwrap();
        let DnsCommand::Classify(a) = t.dns;
        assert_eq!(a.nat64_prefix, ["2001:db8:64::/96"]);
        assert!(a.strict);
        assert_eq!(a.addrs, ["8.8.8.8", "::1"]);
        assert!(
            T::try_parse_from(["dns", "classify"]).is_err(),
            "ADDR is required"
        );
    }
}
