//! Reading the table back from the kernel: chains, sets, counters and map
//! entries. Used to find a sandbox's objects after a restart, and to read
//! counters.

use std::ffi::{c_void, CStr};
use std::io;
use std::ptr::NonNull;

use nftnl::nftnl_sys as sys;

use super::encode::{cstr, parse_comment, NFT_OBJECT_COUNTER};
use super::socket::Netlink;
use crate::names::TABLE;

const FAMILY: u16 = libc::NFPROTO_INET as u16;

#[repr(C, align(8))]
struct ReqBuf([u8; 4096]);

/// A chain as read back: its name and comment.
#[derive(Debug, Clone)]
pub(crate) struct ChainInfo {
    pub name: String,
    pub comment: Option<String>,
}

/// A counter as read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct CounterValue {
    pub packets: u64,
    pub bytes: u64,
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("cannot parse {what}"))
}

fn owned(p: *const libc::c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: libnftnl returns NUL-terminated strings it owns; we copy
    // before the owning object is freed.
    Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// Builds a request: header, then `payload` fills in the attributes.
fn request(
    nl: &mut Netlink,
    msg_type: i32,
    dump: bool,
    payload: impl FnOnce(*mut libc::nlmsghdr),
    each: impl FnMut(&[u8]),
) -> io::Result<()> {
    let mut buf = ReqBuf([0; 4096]);
    let flags = if dump { libc::NLM_F_DUMP as u16 } else { 0 };
    // SAFETY: the buffer is 4 KiB and aligned for nlmsghdr; our requests carry
    // at most a table, a name and a type (well under 200 bytes).
    let nlh = unsafe {
        sys::nftnl_nlmsg_build_hdr(buf.0.as_mut_ptr().cast(), msg_type as u16, FAMILY, flags, 0)
    };
    payload(nlh);
    let len = u32::from_ne_bytes(buf.0[..4].try_into().expect("4 bytes")) as usize;
    nl.request(&buf.0[..len.min(buf.0.len())], dump, each)
}

/// Parses one nf_tables message into a fresh libnftnl object, runs `read`
/// on it and frees it.
macro_rules! with_parsed {
    ($msg:expr, $alloc:ident, $parse:ident, $free:ident, |$o:ident| $read:expr) => {{
        // SAFETY: `$msg` is one complete netlink message from the kernel
        // (length-checked by mnl::NlMessages, 4-byte aligned in our receive
        // buffer); the object is fresh, non-null, and freed right after `read`.
        unsafe {
            match NonNull::new(sys::$alloc()) {
                None => None,
                Some(obj) => {
                    let $o = obj.as_ptr();
                    let r = if sys::$parse($msg.as_ptr().cast(), $o) < 0 {
                        None
                    } else {
                        $read
                    };
                    sys::$free($o);
                    r
                }
            }
        }
    }};
}

/// Does `table inet cleave` exist?
pub(crate) fn table_exists(nl: &mut Netlink) -> io::Result<bool> {
    let name = cstr(TABLE).map_err(io::Error::other)?;
    let r = request(
        nl,
        libc::NFT_MSG_GETTABLE,
        false,
        // SAFETY: `nlh` points into our request buffer; the table object is
        // fresh and freed after its payload is written.
        |nlh| unsafe {
            let t = sys::nftnl_table_alloc();
            if t.is_null() {
                return;
            }
            sys::nftnl_table_set_str(t, sys::NFTNL_TABLE_NAME as u16, name.as_ptr());
            sys::nftnl_table_nlmsg_build_payload(nlh, t);
            sys::nftnl_table_free(t);
        },
        |_| {},
    );
    match r {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Every chain of the table.
pub(crate) fn chains(nl: &mut Netlink) -> io::Result<Vec<ChainInfo>> {
    let table = cstr(TABLE).map_err(io::Error::other)?;
    let mut out = Vec::new();
    let mut failed = false;
    request(
        nl,
        libc::NFT_MSG_GETCHAIN,
        true,
        // SAFETY: as in `table_exists`.
        |nlh| unsafe {
            let c = sys::nftnl_chain_alloc();
            if c.is_null() {
                return;
            }
            sys::nftnl_chain_set_str(c, sys::NFTNL_CHAIN_TABLE as u16, table.as_ptr());
            sys::nftnl_chain_nlmsg_build_payload(nlh, c);
            sys::nftnl_chain_free(c);
        },
        |msg| {
            let info = with_parsed!(
                msg,
                nftnl_chain_alloc,
                nftnl_chain_nlmsg_parse,
                nftnl_chain_free,
                |c| {
                    let t = owned(sys::nftnl_chain_get_str(c, sys::NFTNL_CHAIN_TABLE as u16));
                    let name = owned(sys::nftnl_chain_get_str(c, sys::NFTNL_CHAIN_NAME as u16));
                    let mut len = 0u32;
                    let ud =
                        sys::nftnl_chain_get_data(c, sys::NFTNL_CHAIN_USERDATA as u16, &mut len);
                    let comment = if ud.is_null() {
                        None
                    } else {
                        let bytes = std::slice::from_raw_parts(ud.cast::<u8>(), len as usize);
                        parse_comment(bytes, sys::NFTNL_UDATA_CHAIN_COMMENT)
                    };
                    Some((t, name, comment))
                }
            );
            match info {
                Some((Some(t), Some(name), comment)) => {
                    if t == TABLE {
                        out.push(ChainInfo { name, comment })
                    }
                }
                _ => failed = true,
            }
        },
    )?;
    if failed {
        return Err(bad("chain"));
    }
    Ok(out)
}

/// Every set and map name of the table.
pub(crate) fn sets(nl: &mut Netlink) -> io::Result<Vec<String>> {
    let table = cstr(TABLE).map_err(io::Error::other)?;
    let mut out = Vec::new();
    let mut failed = false;
    request(
        nl,
        libc::NFT_MSG_GETSET,
        true,
        // SAFETY: as in `table_exists`.
        |nlh| unsafe {
            let s = sys::nftnl_set_alloc();
            if s.is_null() {
                return;
            }
            sys::nftnl_set_set_str(s, sys::NFTNL_SET_TABLE as u16, table.as_ptr());
            sys::nftnl_set_nlmsg_build_payload(nlh, s);
            sys::nftnl_set_free(s);
        },
        |msg| {
            let info = with_parsed!(
                msg,
                nftnl_set_alloc,
                nftnl_set_nlmsg_parse,
                nftnl_set_free,
                |s| {
                    Some((
                        owned(sys::nftnl_set_get_str(s, sys::NFTNL_SET_TABLE as u16)),
                        owned(sys::nftnl_set_get_str(s, sys::NFTNL_SET_NAME as u16)),
                    ))
                }
            );
            match info {
                Some((Some(t), Some(name))) => {
                    if t == TABLE {
                        out.push(name)
                    }
                }
                _ => failed = true,
            }
        },
    )?;
    if failed {
        return Err(bad("set"));
    }
    Ok(out)
}

fn counter_payload(nlh: *mut libc::nlmsghdr, name: Option<&CStr>) {
    let Ok(table) = cstr(TABLE) else { return };
    // SAFETY: as in `table_exists`.
    unsafe {
        let o = sys::nftnl_obj_alloc();
        if o.is_null() {
            return;
        }
        sys::nftnl_obj_set_str(o, sys::NFTNL_OBJ_TABLE as u16, table.as_ptr());
        sys::nftnl_obj_set_u32(o, sys::NFTNL_OBJ_TYPE as u16, NFT_OBJECT_COUNTER);
        if let Some(n) = name {
            sys::nftnl_obj_set_str(o, sys::NFTNL_OBJ_NAME as u16, n.as_ptr());
        }
        sys::nftnl_obj_nlmsg_build_payload(nlh, o);
        sys::nftnl_obj_free(o);
    }
}

fn parse_counter(msg: &[u8]) -> Option<(Option<String>, Option<String>, u32, CounterValue)> {
    with_parsed!(
        msg,
        nftnl_obj_alloc,
        nftnl_obj_nlmsg_parse,
        nftnl_obj_free,
        |o| {
            Some((
                owned(sys::nftnl_obj_get_str(o, sys::NFTNL_OBJ_TABLE as u16)),
                owned(sys::nftnl_obj_get_str(o, sys::NFTNL_OBJ_NAME as u16)),
                sys::nftnl_obj_get_u32(o, sys::NFTNL_OBJ_TYPE as u16),
                CounterValue {
                    packets: sys::nftnl_obj_get_u64(o, sys::NFTNL_OBJ_CTR_PKTS as u16),
                    bytes: sys::nftnl_obj_get_u64(o, sys::NFTNL_OBJ_CTR_BYTES as u16),
                },
            ))
        }
    )
}

/// Every counter object name of the table.
pub(crate) fn counters(nl: &mut Netlink) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut failed = false;
    request(
        nl,
        libc::NFT_MSG_GETOBJ,
        true,
        |nlh| counter_payload(nlh, None),
        |msg| match parse_counter(msg) {
            Some((Some(t), Some(name), ty, _)) => {
                if t == TABLE && ty == NFT_OBJECT_COUNTER {
                    out.push(name)
                }
            }
            _ => failed = true,
        },
    )?;
    if failed {
        return Err(bad("counter"));
    }
    Ok(out)
}

/// One named counter's value.
pub(crate) fn counter(nl: &mut Netlink, name: &str) -> io::Result<CounterValue> {
    let cname = cstr(name).map_err(io::Error::other)?;
    let mut value = None;
    request(
        nl,
        libc::NFT_MSG_GETOBJ,
        false,
        |nlh| counter_payload(nlh, Some(&cname)),
        |msg| {
            if let Some((_, Some(n), _, v)) = parse_counter(msg) {
                if n == name {
                    value = Some(v);
                }
            }
        },
    )?;
    value.ok_or_else(|| bad("counter"))
}

/// Entries of a verdict map: key bytes and the chain they jump/goto to.
pub(crate) fn map_entries(
    nl: &mut Netlink,
    map: &str,
) -> io::Result<Vec<(Vec<u8>, Option<String>)>> {
    let table = cstr(TABLE).map_err(io::Error::other)?;
    let set_name = cstr(map).map_err(io::Error::other)?;
    let mut out: Vec<(Vec<u8>, Option<String>)> = Vec::new();
    let mut failed = false;
    unsafe extern "C" fn each_elem(e: *mut sys::nftnl_set_elem, data: *mut c_void) -> libc::c_int {
        // SAFETY: `data` is the `&mut Vec` passed to nftnl_set_elem_foreach
        // below, alive for the call; `e` is an element owned by the set.
        unsafe {
            let out = &mut *data.cast::<Vec<(Vec<u8>, Option<String>)>>();
            let mut len = 0u32;
            let k = sys::nftnl_set_elem_get(e, sys::NFTNL_SET_ELEM_KEY as u16, &mut len);
            let key = if k.is_null() {
                Vec::new()
            } else {
                std::slice::from_raw_parts(k.cast::<u8>(), len as usize).to_vec()
            };
            let chain = if sys::nftnl_set_elem_is_set(e, sys::NFTNL_SET_ELEM_CHAIN as u16) {
                owned(sys::nftnl_set_elem_get_str(
                    e,
                    sys::NFTNL_SET_ELEM_CHAIN as u16,
                ))
            } else {
                None
            };
            out.push((key, chain));
        }
        0
    }
    request(
        nl,
        libc::NFT_MSG_GETSETELEM,
        true,
        // SAFETY: as in `table_exists`; NFTA_SET_TABLE/NAME share numbers
        // with NFTA_SET_ELEM_LIST_TABLE/SET, which is what a get expects.
        |nlh| unsafe {
            let s = sys::nftnl_set_alloc();
            if s.is_null() {
                return;
            }
            sys::nftnl_set_set_str(s, sys::NFTNL_SET_TABLE as u16, table.as_ptr());
            sys::nftnl_set_set_str(s, sys::NFTNL_SET_NAME as u16, set_name.as_ptr());
            sys::nftnl_set_nlmsg_build_payload(nlh, s);
            sys::nftnl_set_free(s);
        },
        |msg| {
            let ok = with_parsed!(
                msg,
                nftnl_set_alloc,
                nftnl_set_elems_nlmsg_parse,
                nftnl_set_free,
                |s| {
                    Some(sys::nftnl_set_elem_foreach(
                        s,
                        Some(each_elem),
                        (&mut out as *mut Vec<_>).cast(),
                    ))
                }
            );
            if ok.is_none() {
                failed = true;
            }
        },
    )?;
    if failed {
        return Err(bad("map entries"));
    }
    Ok(out)
}
