//! Turns plan [`Op`]s into libnftnl objects and netlink messages.
//!
//! This is the only module that builds libnftnl objects, so the FFI calls
//! that write them are all here. Each owned pointer lives in a [`Msg`] and is
//! freed by its `Drop`.

use std::ffi::{c_void, CString};
use std::ptr::NonNull;

use nftnl::nftnl_sys as sys;
use nftnl::{Batch, FinalizedBatch, MsgType, NlMsg};

use crate::expr::{Base, CmpOp, Expr, MetaKey, Reg, Verdict};
use crate::names::TABLE;
use crate::plan::{BaseHook, ElemsSpec, KeyType, Op};

/// `NFT_OBJECT_COUNTER` from `linux/netfilter/nf_tables.h`.
pub(crate) const NFT_OBJECT_COUNTER: u32 = 1;
const FAMILY: u16 = libc::NFPROTO_INET as u16;
/// nft's `BYTEORDER_HOST_ENDIAN`, recorded in a set's user data.
const BYTEORDER_HOST_ENDIAN: u32 = 1;

/// A string for libnftnl. Every name we send is validated and has no NUL; a
/// NUL here is a bug, reported as an error rather than a panic.
pub(crate) fn cstr(s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("name {s:?} contains a NUL byte"))
}

/// A libnftnl user-data blob holding one comment TLV, as `nft` writes it
/// (`type, len, bytes, NUL`).
fn comment_udata(kind: u32, comment: &str) -> Vec<u8> {
    // libnftnl caps comments at 128 bytes including the NUL.
    let max = sys::NFTNL_UDATA_COMMENT_MAXLEN as usize - 1;
    let bytes = &comment.as_bytes()[..comment.len().min(max)];
    let mut out = Vec::with_capacity(bytes.len() + 3);
    out.push(kind as u8);
    out.push((bytes.len() + 1) as u8);
    out.extend_from_slice(bytes);
    out.push(0);
    out
}

/// Finds the comment TLV of type `kind` in a user-data blob from the kernel.
pub(crate) fn parse_comment(udata: &[u8], kind: u32) -> Option<String> {
    let mut rest = udata;
    while rest.len() >= 2 {
        let (t, len) = (rest[0], rest[1] as usize);
        let value = rest.get(2..2 + len)?;
        if u32::from(t) == kind {
            let s = value.split(|&b| b == 0).next()?;
            return String::from_utf8(s.to_vec()).ok();
        }
        rest = &rest[2 + len..];
    }
    None
}

enum Obj {
    Table(NonNull<sys::nftnl_table>),
    Chain(NonNull<sys::nftnl_chain>),
    Set(NonNull<sys::nftnl_set>),
    Rule(NonNull<sys::nftnl_rule>),
    Counter(NonNull<sys::nftnl_obj>),
    Elems(NonNull<sys::nftnl_set>),
}

/// One netlink message: a libnftnl object plus its header fields.
pub(crate) struct Msg {
    obj: Obj,
    msg_type: u16,
    flags: u16,
}

fn alloc<T>(p: *mut T) -> NonNull<T> {
    // libnftnl returns NULL only when malloc fails; like std, abort on OOM.
    NonNull::new(p).unwrap_or_else(|| std::process::abort())
}

const ACK: u16 = libc::NLM_F_ACK as u16;
const CREATE: u16 = libc::NLM_F_CREATE as u16;
const EXCL: u16 = libc::NLM_F_EXCL as u16;
const APPEND: u16 = libc::NLM_F_APPEND as u16;

impl Msg {
    /// Builds the message for `op`.
    pub(crate) fn new(op: &Op, set_id: &mut u32) -> Result<Msg, String> {
        let table = cstr(TABLE)?;
        // SAFETY: every pointer passed below is either a freshly allocated,
        // non-null libnftnl object owned by this function (and then by the
        // returned Msg), or a NUL-terminated CString / slice that outlives the
        // call; libnftnl copies strings and data it is given.
        unsafe {
            Ok(match op {
                Op::AddTable { comment } => {
                    let t = alloc(sys::nftnl_table_alloc());
                    sys::nftnl_table_set_u32(
                        t.as_ptr(),
                        sys::NFTNL_TABLE_FAMILY as u16,
                        FAMILY.into(),
                    );
                    sys::nftnl_table_set_str(
                        t.as_ptr(),
                        sys::NFTNL_TABLE_NAME as u16,
                        table.as_ptr(),
                    );
                    let ud = comment_udata(sys::NFTNL_UDATA_TABLE_COMMENT, comment);
                    sys::nftnl_table_set_data(
                        t.as_ptr(),
                        sys::NFTNL_TABLE_USERDATA as u16,
                        ud.as_ptr().cast(),
                        ud.len() as u32,
                    );
                    Msg {
                        obj: Obj::Table(t),
                        msg_type: libc::NFT_MSG_NEWTABLE as u16,
                        flags: ACK | CREATE | EXCL,
                    }
                }
                Op::AddChain(spec) => {
                    let c = chain(&table, &cstr(&spec.name)?);
                    if let Some(hook) = spec.hook {
                        let (num, prio, kind) = match hook {
                            BaseHook::Forward => (libc::NF_INET_FORWARD, 0, c"filter"),
                            BaseHook::Input => (libc::NF_INET_LOCAL_IN, 0, c"filter"),
                            BaseHook::Postrouting => (libc::NF_INET_POST_ROUTING, 100, c"nat"),
                        };
                        sys::nftnl_chain_set_u32(
                            c.as_ptr(),
                            sys::NFTNL_CHAIN_HOOKNUM as u16,
                            num as u32,
                        );
                        sys::nftnl_chain_set_s32(c.as_ptr(), sys::NFTNL_CHAIN_PRIO as u16, prio);
                        sys::nftnl_chain_set_str(
                            c.as_ptr(),
                            sys::NFTNL_CHAIN_TYPE as u16,
                            kind.as_ptr(),
                        );
                        sys::nftnl_chain_set_u32(
                            c.as_ptr(),
                            sys::NFTNL_CHAIN_POLICY as u16,
                            libc::NF_ACCEPT as u32,
                        );
                    }
                    if let Some(comment) = &spec.comment {
                        let ud = comment_udata(sys::NFTNL_UDATA_CHAIN_COMMENT, comment);
                        sys::nftnl_chain_set_data(
                            c.as_ptr(),
                            sys::NFTNL_CHAIN_USERDATA as u16,
                            ud.as_ptr().cast(),
                            ud.len() as u32,
                        );
                    }
                    Msg {
                        obj: Obj::Chain(c),
                        msg_type: libc::NFT_MSG_NEWCHAIN as u16,
                        flags: ACK | CREATE | EXCL,
                    }
                }
                Op::AddSet(spec) => {
                    let s = set(&table, &cstr(&spec.name)?);
                    *set_id += 1;
                    let p = s.as_ptr();
                    sys::nftnl_set_set_u32(p, sys::NFTNL_SET_ID as u16, *set_id);
                    sys::nftnl_set_set_u32(p, sys::NFTNL_SET_KEY_TYPE as u16, spec.key.nft_type());
                    sys::nftnl_set_set_u32(p, sys::NFTNL_SET_KEY_LEN as u16, spec.key.len());
                    let mut flags = 0u32;
                    if spec.verdict_map {
                        flags |= libc::NFT_SET_MAP as u32;
                        sys::nftnl_set_set_u32(
                            p,
                            sys::NFTNL_SET_DATA_TYPE as u16,
                            libc::NFT_DATA_VERDICT,
                        );
                    }
                    if spec.timeout {
                        flags |= libc::NFT_SET_TIMEOUT as u32;
                    }
                    let fields = spec.key.concat_fields();
                    if spec.interval {
                        flags |= libc::NFT_SET_INTERVAL as u32;
                        if !fields.is_empty() {
                            flags |= NFT_SET_CONCAT;
                        }
                    }
                    if spec.interval && !fields.is_empty() {
                        // The field lengths let the kernel pick its interval-concatenation
                        // backend (pipapo).
                        sys::nftnl_set_set_data(
                            p,
                            sys::NFTNL_SET_DESC_CONCAT as u16,
                            fields.as_ptr().cast(),
                            fields.len() as u32,
                        );
                    }
                    sys::nftnl_set_set_u32(p, sys::NFTNL_SET_FLAGS as u16, flags);
                    if let Some(size) = spec.size {
                        sys::nftnl_set_set_u32(p, sys::NFTNL_SET_DESC_SIZE as u16, size);
                    }
                    // nft reads string keys back in host byte order only if
                    // the set says so; without it `nft list` shows "".
                    let mut ud = Vec::new();
                    if spec.key == KeyType::IfName {
                        ud.extend_from_slice(&[sys::NFTNL_UDATA_SET_KEYBYTEORDER as u8, 4]);
                        ud.extend_from_slice(&BYTEORDER_HOST_ENDIAN.to_ne_bytes());
                    }
                    if let Some(comment) = &spec.comment {
                        ud.extend(comment_udata(sys::NFTNL_UDATA_SET_COMMENT, comment));
                    }
                    if !ud.is_empty() {
                        sys::nftnl_set_set_data(
                            p,
                            sys::NFTNL_SET_USERDATA as u16,
                            ud.as_ptr().cast(),
                            ud.len() as u32,
                        );
                    }
                    Msg {
                        obj: Obj::Set(s),
                        msg_type: libc::NFT_MSG_NEWSET as u16,
                        flags: ACK | CREATE | EXCL,
                    }
                }
                Op::AddCounter { name, comment } => {
                    let o = counter(&table, &cstr(name)?);
                    let ud = comment_udata(sys::NFTNL_UDATA_OBJ_COMMENT, comment);
                    sys::nftnl_obj_set_data(
                        o.as_ptr(),
                        sys::NFTNL_OBJ_USERDATA as u16,
                        ud.as_ptr().cast(),
                        ud.len() as u32,
                    );
                    Msg {
                        obj: Obj::Counter(o),
                        msg_type: libc::NFT_MSG_NEWOBJ as u16,
                        flags: ACK | CREATE | EXCL,
                    }
                }
                Op::AddRule(spec) => {
                    let r = alloc(sys::nftnl_rule_alloc());
                    let chain_name = cstr(&spec.chain)?;
                    sys::nftnl_rule_set_u32(
                        r.as_ptr(),
                        sys::NFTNL_RULE_FAMILY as u16,
                        FAMILY.into(),
                    );
                    sys::nftnl_rule_set_str(
                        r.as_ptr(),
                        sys::NFTNL_RULE_TABLE as u16,
                        table.as_ptr(),
                    );
                    sys::nftnl_rule_set_str(
                        r.as_ptr(),
                        sys::NFTNL_RULE_CHAIN as u16,
                        chain_name.as_ptr(),
                    );
                    // The rule owns `r` from here: build it into a Msg first so
                    // an error below still frees it.
                    let msg = Msg {
                        obj: Obj::Rule(r),
                        msg_type: libc::NFT_MSG_NEWRULE as u16,
                        flags: ACK | CREATE | APPEND | EXCL,
                    };
                    for e in &spec.exprs.0 {
                        let e = expr(e)?;
                        sys::nftnl_rule_add_expr(r.as_ptr(), e.as_ptr());
                    }
                    if let Some(comment) = &spec.comment {
                        let ud = comment_udata(sys::NFTNL_UDATA_RULE_COMMENT, comment);
                        sys::nftnl_rule_set_data(
                            r.as_ptr(),
                            sys::NFTNL_RULE_USERDATA as u16,
                            ud.as_ptr().cast(),
                            ud.len() as u32,
                        );
                    }
                    msg
                }
                Op::AddElems(spec) => {
                    let flags = ACK | CREATE | if spec.exclusive { EXCL } else { 0 };
                    Msg {
                        obj: Obj::Elems(elems(&table, spec)?),
                        msg_type: libc::NFT_MSG_NEWSETELEM as u16,
                        flags,
                    }
                }
                Op::DelElems(spec) => Msg {
                    obj: Obj::Elems(elems(&table, spec)?),
                    msg_type: libc::NFT_MSG_DELSETELEM as u16,
                    flags: ACK,
                },
                // A DELSETELEM without an element list flushes the set.
                Op::FlushSet(name) => Msg {
                    obj: Obj::Elems(set(&table, &cstr(name)?)),
                    msg_type: libc::NFT_MSG_DELSETELEM as u16,
                    flags: ACK,
                },
                Op::DelChain(name) => Msg {
                    obj: Obj::Chain(chain(&table, &cstr(name)?)),
                    msg_type: libc::NFT_MSG_DELCHAIN as u16,
                    flags: ACK,
                },
                Op::DelSet(name) => Msg {
                    obj: Obj::Set(set(&table, &cstr(name)?)),
                    msg_type: libc::NFT_MSG_DELSET as u16,
                    flags: ACK,
                },
                Op::DelCounter(name) => Msg {
                    obj: Obj::Counter(counter(&table, &cstr(name)?)),
                    msg_type: libc::NFT_MSG_DELOBJ as u16,
                    flags: ACK,
                },
            })
        }
    }
}

/// # Safety
/// `table` and `name` must be valid C strings (guaranteed by `&CString`).
unsafe fn chain(table: &CString, name: &CString) -> NonNull<sys::nftnl_chain> {
    let c = alloc(
        // SAFETY: an allocation with no arguments; `alloc` checks it for null.
        unsafe { sys::nftnl_chain_alloc() },
    );
    // SAFETY: `c` is a fresh, non-null chain; the strings are copied.
    unsafe {
        sys::nftnl_chain_set_u32(c.as_ptr(), sys::NFTNL_CHAIN_FAMILY as u16, FAMILY.into());
        sys::nftnl_chain_set_str(c.as_ptr(), sys::NFTNL_CHAIN_TABLE as u16, table.as_ptr());
        sys::nftnl_chain_set_str(c.as_ptr(), sys::NFTNL_CHAIN_NAME as u16, name.as_ptr());
    }
    c
}

/// # Safety
/// As [`chain`].
unsafe fn set(table: &CString, name: &CString) -> NonNull<sys::nftnl_set> {
    let s = alloc(
        // SAFETY: an allocation with no arguments; `alloc` checks it for null.
        unsafe { sys::nftnl_set_alloc() },
    );
    // SAFETY: `s` is a fresh, non-null set; the strings are copied.
    unsafe {
        sys::nftnl_set_set_u32(s.as_ptr(), sys::NFTNL_SET_FAMILY as u16, FAMILY.into());
        sys::nftnl_set_set_str(s.as_ptr(), sys::NFTNL_SET_TABLE as u16, table.as_ptr());
        sys::nftnl_set_set_str(s.as_ptr(), sys::NFTNL_SET_NAME as u16, name.as_ptr());
    }
    s
}

/// # Safety
/// As [`chain`].
pub(crate) unsafe fn counter(table: &CString, name: &CString) -> NonNull<sys::nftnl_obj> {
    let o = alloc(
        // SAFETY: an allocation with no arguments; `alloc` checks it for null.
        unsafe { sys::nftnl_obj_alloc() },
    );
    // SAFETY: `o` is a fresh, non-null object; the strings are copied.
    unsafe {
        sys::nftnl_obj_set_u32(o.as_ptr(), sys::NFTNL_OBJ_FAMILY as u16, FAMILY.into());
        sys::nftnl_obj_set_str(o.as_ptr(), sys::NFTNL_OBJ_TABLE as u16, table.as_ptr());
        sys::nftnl_obj_set_str(o.as_ptr(), sys::NFTNL_OBJ_NAME as u16, name.as_ptr());
        sys::nftnl_obj_set_u32(o.as_ptr(), sys::NFTNL_OBJ_TYPE as u16, NFT_OBJECT_COUNTER);
    }
    o
}

fn elems(table: &CString, spec: &ElemsSpec) -> Result<NonNull<sys::nftnl_set>, String> {
    let name = cstr(&spec.set)?;
    // SAFETY: as in `set`; each element is fresh and handed to the set, which
    // owns and frees it; key data is copied (keys are at most 20 bytes, under
    // libnftnl's 64-byte key buffer).
    unsafe {
        let s = set(table, &name);
        for e in &spec.elems {
            let el = alloc(sys::nftnl_set_elem_alloc());
            sys::nftnl_set_elem_add(s.as_ptr(), el.as_ptr());
            if e.key.len() > 64 {
                sys::nftnl_set_free(s.as_ptr());
                return Err(format!("set key of {} bytes", e.key.len()));
            }
            sys::nftnl_set_elem_set(
                el.as_ptr(),
                sys::NFTNL_SET_ELEM_KEY as u16,
                e.key.as_ptr().cast(),
                e.key.len() as u32,
            );
            if let Some(end) = &e.key_end {
                if end.len() > 64 {
                    sys::nftnl_set_free(s.as_ptr());
                    return Err(format!("set key end of {} bytes", end.len()));
                }
                sys::nftnl_set_elem_set(
                    el.as_ptr(),
                    sys::NFTNL_SET_ELEM_KEY_END as u16,
                    end.as_ptr().cast(),
                    end.len() as u32,
                );
            }
            if let Some(chain) = &e.goto {
                let chain = match cstr(chain) {
                    Ok(c) => c,
                    Err(err) => {
                        sys::nftnl_set_free(s.as_ptr());
                        return Err(err);
                    }
                };
                sys::nftnl_set_elem_set_u32(
                    el.as_ptr(),
                    sys::NFTNL_SET_ELEM_VERDICT as u16,
                    libc::NFT_GOTO as u32,
                );
                sys::nftnl_set_elem_set_str(
                    el.as_ptr(),
                    sys::NFTNL_SET_ELEM_CHAIN as u16,
                    chain.as_ptr(),
                );
            }
            if let Some(ms) = e.timeout_ms {
                sys::nftnl_set_elem_set_u64(el.as_ptr(), sys::NFTNL_SET_ELEM_TIMEOUT as u16, ms);
            }
        }
        Ok(s)
    }
}

fn expr(e: &Expr) -> Result<NonNull<sys::nftnl_expr>, String> {
    let name = match e {
        Expr::Meta { .. } => c"meta",
        Expr::Payload { .. } => c"payload",
        Expr::Cmp { .. } => c"cmp",
        Expr::Mask { .. } => c"bitwise",
        Expr::CtState { .. } => c"ct",
        Expr::Lookup { .. } => c"lookup",
        Expr::Counter { .. } => c"objref",
        Expr::Masquerade => c"masq",
        Expr::Verdict(_) => c"immediate",
    };
    // SAFETY: `x` is a fresh, non-null expression of the type named above,
    // and each attribute set below belongs to that type; data and strings
    // are copied by libnftnl.
    unsafe {
        let x = alloc(sys::nftnl_expr_alloc(name.as_ptr()));
        let p = x.as_ptr();
        let set_u32 = |attr: u32, v: u32| sys::nftnl_expr_set_u32(p, attr as u16, v);
        let set_data = |attr: u32, d: &[u8]| {
            sys::nftnl_expr_set(p, attr as u16, d.as_ptr() as *const c_void, d.len() as u32)
        };
        match e {
            Expr::Meta { key, dreg } => {
                let k = match key {
                    MetaKey::NfProto => libc::NFT_META_NFPROTO,
                    MetaKey::L4Proto => libc::NFT_META_L4PROTO,
                    MetaKey::IifType => libc::NFT_META_IIFTYPE,
                    MetaKey::OifName => libc::NFT_META_OIFNAME,
                    MetaKey::IifName => libc::NFT_META_IIFNAME,
                };
                set_u32(sys::NFTNL_EXPR_META_KEY, k as u32);
                set_u32(sys::NFTNL_EXPR_META_DREG, dreg.raw());
            }
            Expr::Payload {
                base,
                offset,
                len,
                dreg,
            } => {
                let b = match base {
                    Base::Link => libc::NFT_PAYLOAD_LL_HEADER,
                    Base::Network => libc::NFT_PAYLOAD_NETWORK_HEADER,
                    Base::Transport => libc::NFT_PAYLOAD_TRANSPORT_HEADER,
                };
                set_u32(sys::NFTNL_EXPR_PAYLOAD_BASE, b as u32);
                set_u32(sys::NFTNL_EXPR_PAYLOAD_OFFSET, *offset);
                set_u32(sys::NFTNL_EXPR_PAYLOAD_LEN, *len);
                set_u32(sys::NFTNL_EXPR_PAYLOAD_DREG, dreg.raw());
            }
            Expr::Cmp { sreg, op, data } => {
                let o = match op {
                    CmpOp::Eq => libc::NFT_CMP_EQ,
                    CmpOp::Neq => libc::NFT_CMP_NEQ,
                };
                set_u32(sys::NFTNL_EXPR_CMP_SREG, sreg.raw());
                set_u32(sys::NFTNL_EXPR_CMP_OP, o as u32);
                set_data(sys::NFTNL_EXPR_CMP_DATA, data);
            }
            Expr::Mask { reg, mask } => {
                let xor = vec![0u8; mask.len()];
                set_u32(sys::NFTNL_EXPR_BITWISE_SREG, reg.raw());
                set_u32(sys::NFTNL_EXPR_BITWISE_DREG, reg.raw());
                set_u32(sys::NFTNL_EXPR_BITWISE_LEN, mask.len() as u32);
                set_data(sys::NFTNL_EXPR_BITWISE_MASK, mask);
                set_data(sys::NFTNL_EXPR_BITWISE_XOR, &xor);
            }
            Expr::CtState { dreg } => {
                set_u32(sys::NFTNL_EXPR_CT_KEY, libc::NFT_CT_STATE as u32);
                set_u32(sys::NFTNL_EXPR_CT_DREG, dreg.raw());
            }
            Expr::Lookup { set, sreg, dreg } => {
                let s = match cstr(set) {
                    Ok(s) => s,
                    Err(err) => {
                        sys::nftnl_expr_free(p);
                        return Err(err);
                    }
                };
                set_u32(sys::NFTNL_EXPR_LOOKUP_SREG, sreg.raw());
                sys::nftnl_expr_set_str(p, sys::NFTNL_EXPR_LOOKUP_SET as u16, s.as_ptr());
                if let Some(d) = dreg {
                    set_u32(sys::NFTNL_EXPR_LOOKUP_DREG, d.raw());
                }
            }
            Expr::Counter { name } => {
                let n = match cstr(name) {
                    Ok(n) => n,
                    Err(err) => {
                        sys::nftnl_expr_free(p);
                        return Err(err);
                    }
                };
                set_u32(sys::NFTNL_EXPR_OBJREF_IMM_TYPE, NFT_OBJECT_COUNTER);
                sys::nftnl_expr_set_str(p, sys::NFTNL_EXPR_OBJREF_IMM_NAME as u16, n.as_ptr());
            }
            Expr::Masquerade => {}
            Expr::Verdict(v) => {
                let code = match v {
                    Verdict::Accept => libc::NF_ACCEPT,
                    Verdict::Drop => libc::NF_DROP,
                };
                set_u32(sys::NFTNL_EXPR_IMM_DREG, Reg::Verdict.raw());
                set_u32(sys::NFTNL_EXPR_IMM_VERDICT, code as u32);
            }
        }
        Ok(x)
    }
}

// SAFETY: `write` builds one header plus the payload of one libnftnl object,
// never more than `nft_nlmsg_maxsize()` bytes: set element messages are the
// only variable-size ones and the plan bounds them (see `plan::pin_plan`).
unsafe impl NlMsg for Msg {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, _: MsgType) {
        // SAFETY: the caller (nftnl's Batch) passes a buffer of at least
        // `nft_nlmsg_maxsize()` bytes; our object pointers are valid.
        unsafe {
            let nlh =
                sys::nftnl_nlmsg_build_hdr(buf.cast(), self.msg_type, FAMILY, self.flags, seq);
            match self.obj {
                Obj::Table(t) => sys::nftnl_table_nlmsg_build_payload(nlh, t.as_ptr()),
                Obj::Chain(c) => sys::nftnl_chain_nlmsg_build_payload(nlh, c.as_ptr()),
                Obj::Set(s) => sys::nftnl_set_nlmsg_build_payload(nlh, s.as_ptr()),
                Obj::Rule(r) => sys::nftnl_rule_nlmsg_build_payload(nlh, r.as_ptr()),
                Obj::Counter(o) => sys::nftnl_obj_nlmsg_build_payload(nlh, o.as_ptr()),
                Obj::Elems(s) => sys::nftnl_set_elems_nlmsg_build_payload(nlh, s.as_ptr()),
            }
        }
    }
}

impl Drop for Msg {
    fn drop(&mut self) {
        // SAFETY: each pointer was allocated by the matching libnftnl
        // allocator and is owned only by this Msg.
        unsafe {
            match self.obj {
                Obj::Table(t) => sys::nftnl_table_free(t.as_ptr()),
                Obj::Chain(c) => sys::nftnl_chain_free(c.as_ptr()),
                Obj::Set(s) | Obj::Elems(s) => sys::nftnl_set_free(s.as_ptr()),
                Obj::Rule(r) => sys::nftnl_rule_free(r.as_ptr()),
                Obj::Counter(o) => sys::nftnl_obj_free(o.as_ptr()),
            }
        }
    }
}

/// A finalized batch and where the plan's messages sit in its sequence
/// numbers.
pub(crate) struct Encoded {
    pub batch: FinalizedBatch,
    /// Sequence number of the plan's first op.
    pub first_op_seq: u32,
    /// The last sequence number the kernel acknowledges.
    pub last_seq: u32,
    /// Number of plan ops in the batch.
    pub ops: usize,
}

/// `NFT_SET_CONCAT` (not in the libc crate): a set whose key is a concatenation.
const NFT_SET_CONCAT: u32 = 0x80;

/// Small pages keep the batch buffer off mmap; a batch spanning several
/// pages is still sent as one datagram (see `socket`).
const BATCH_PAGE: u32 = 32 * 1024;

/// Encodes `ops` into one batch.
pub(crate) fn encode(ops: &[Op]) -> Result<Encoded, String> {
    let mut batch = Batch::with_page_size(BATCH_PAGE);
    let mut set_id = 0;
    for op in ops {
        let msg = Msg::new(op, &mut set_id)?;
        batch.add(&msg, MsgType::Add);
    }
    let batch = batch.finalize();
    let seqs = batch.sequence_numbers();
    let n = ops.len() as u32;
    // Kernels >= 6.10 also ack batch begin and end; nftnl numbers them then.
    let first_op_seq = if seqs.end - seqs.start == n + 2 {
        seqs.start + 1
    } else {
        seqs.start
    };
    Ok(Encoded {
        batch,
        first_op_seq,
        last_seq: seqs.end.saturating_sub(1),
        ops: ops.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan;

    #[test]
    fn comment_udata_round_trips() {
        let ud = comment_udata(7, "hello");
        assert_eq!(ud, b"\x07\x06hello\0");
        assert_eq!(parse_comment(&ud, 7).as_deref(), Some("hello"));
        assert_eq!(parse_comment(&ud, 0), None);
        // a key-byteorder TLV before the comment is skipped
        let mut two = vec![0u8, 4, 1, 0, 0, 0];
        two.extend_from_slice(&ud);
        assert_eq!(parse_comment(&two, 7).as_deref(), Some("hello"));
        // truncated input is rejected, not read past
        assert_eq!(parse_comment(&ud[..4], 7), None);
        let long = "x".repeat(300);
        assert_eq!(comment_udata(0, &long).len(), 2 + 128);
    }

    #[test]
    fn encodes_a_whole_apply_plan_into_one_batch() {
        use crate::names::{SandboxId, TapName};
        use crate::sandbox::{MacAddr, SandboxNet};
        let net = SandboxNet::new(
            SandboxId::new("sb").unwrap(),
            TapName::new("tap0").unwrap(),
            MacAddr::new([2, 0, 0, 0, 0, 1]).unwrap(),
            "10.0.0.2".parse().unwrap(),
            "10.0.0.1".parse().unwrap(),
        )
        .unwrap();
        let ops = plan::apply_plan(&net);
        let enc = encode(&ops).unwrap();
        let bytes: usize = enc.batch.iter().map(|p| p.len()).sum();
        assert!(
            bytes > 100 * ops.len() / 2,
            "{bytes} bytes for {} ops",
            ops.len()
        );
        assert!(enc.last_seq - enc.first_op_seq + 1 >= ops.len() as u32);
        // every message is an nf_tables message for family inet
        let mut flat = Vec::new();
        for p in &enc.batch {
            flat.extend_from_slice(p);
        }
        let mut off = 0;
        let mut count = 0;
        while off + 16 <= flat.len() {
            let len = u32::from_ne_bytes(flat[off..off + 4].try_into().unwrap()) as usize;
            let ty = u16::from_ne_bytes(flat[off + 4..off + 6].try_into().unwrap());
            count += 1;
            if ty >> 8 == libc::NFNL_SUBSYS_NFTABLES as u16 {
                assert_eq!(flat[off + 16], libc::NFPROTO_INET as u8);
            }
            off += len.next_multiple_of(4);
        }
        assert_eq!(count, ops.len() + 2, "begin + ops + end");
    }
}
