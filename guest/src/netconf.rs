//! Interface configuration over rtnetlink: addresses, link state and default routes.
//!
//! The guest agent applies a fork's network identity with it (after the reseed gate), and
//! the node agent configures the host side of each tap with it. Calls are synchronous: each
//! runs its requests on a small current-thread runtime of its own.

use std::net::IpAddr;

use futures_util::stream::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

/// Which interface to configure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    Name(String),
    /// The interface whose hardware address this is (the guest finds its NIC this way).
    Mac([u8; 6]),
}

impl std::fmt::Display for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Link::Name(n) => f.write_str(n),
            Link::Mac(m) => write!(
                f,
                "the interface with MAC {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                m[0], m[1], m[2], m[3], m[4], m[5]
            ),
        }
    }
}

/// What to put on one interface.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InterfacePlan {
    /// Addresses with their prefix lengths (IPv6 ones skip duplicate address detection:
    /// the tap has exactly two ends, both ours).
    pub addresses: Vec<(IpAddr, u8)>,
    /// Default routes through these gateways (at most one per family).
    pub gateways: Vec<IpAddr>,
    /// Bring `lo` up as well.
    pub loopback_up: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum NetconfError {
    #[error("opening a netlink socket: {0}")]
    Socket(std::io::Error),
    #[error("{link} does not exist")]
    NoSuchLink { link: String },
    #[error("{step} on {link}: {source}")]
    Netlink {
        step: &'static str,
        link: String,
        source: rtnetlink::Error,
    },
}

/// Applies `plan` to `link`: addresses, link up, default routes, in that order.
pub fn apply(link: &Link, plan: &InterfacePlan) -> Result<(), NetconfError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(NetconfError::Socket)?;
    rt.block_on(async {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetconfError::Socket)?;
        let conn = tokio::spawn(conn);
        let r = apply_with(&handle, link, plan).await;
        conn.abort();
        r
    })
}

async fn index_of(handle: &Handle, link: &Link) -> Result<u32, NetconfError> {
    let err = |step, source| NetconfError::Netlink {
        step,
        link: link.to_string(),
        source,
    };
    match link {
        Link::Name(name) => {
            let mut links = handle.link().get().match_name(name.clone()).execute();
            match links.try_next().await {
                Ok(Some(l)) => Ok(l.header.index),
                Ok(None) => Err(NetconfError::NoSuchLink {
                    link: link.to_string(),
                }),
                // The kernel answers ENODEV for a name it does not know.
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {
                    Err(NetconfError::NoSuchLink {
                        link: link.to_string(),
                    })
                }
                Err(e) => Err(err("looking up the link", e)),
            }
        }
        Link::Mac(mac) => {
            let mut links = handle.link().get().execute();
            while let Some(l) = links
                .try_next()
                .await
                .map_err(|e| err("listing links", e))?
            {
                let matches = l
                    .attributes
                    .iter()
                    .any(|a| matches!(a, LinkAttribute::Address(b) if b.as_slice() == mac));
                if matches {
                    return Ok(l.header.index);
                }
            }
            Err(NetconfError::NoSuchLink {
                link: link.to_string(),
            })
        }
    }
}

async fn set_up(handle: &Handle, index: u32) -> Result<(), rtnetlink::Error> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
}

async fn apply_with(
    handle: &Handle,
    link: &Link,
    plan: &InterfacePlan,
) -> Result<(), NetconfError> {
    let err = |step, source| NetconfError::Netlink {
        step,
        link: link.to_string(),
        source,
    };
    if plan.loopback_up {
        let lo = index_of(handle, &Link::Name("lo".into())).await?;
        set_up(handle, lo)
            .await
            .map_err(|e| err("bringing lo up", e))?;
    }
    let index = index_of(handle, link).await?;
    for &(addr, prefix) in &plan.addresses {
        let mut req = handle.address().add(index, addr, prefix).replace();
        if addr.is_ipv6() {
            req.message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        req.execute()
            .await
            .map_err(|e| err("adding an address", e))?;
    }
    set_up(handle, index)
        .await
        .map_err(|e| err("bringing the link up", e))?;
    for gw in &plan.gateways {
        let route = match gw {
            IpAddr::V4(g) => RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                .gateway(*g)
                .output_interface(index)
                .build(),
            IpAddr::V6(g) => RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                .gateway(*g)
                .output_interface(index)
                .build(),
        };
        handle
            .route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(|e| err("adding the default route", e))?;
    }
    Ok(())
}
