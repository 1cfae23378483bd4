//! Where one command goes in a cluster, decided from its arguments and what
//! the command model ([`Commands`]: key positions, split and fan-out kinds)
//! says of it (pure; the slot map turns a slot into a node later):
//!
//! - [`Plan::Slot`]: every key in one slot -> that slot's owner.
//! - [`Plan::Any`]: no keys -> any primary (PING, INFO, PUBLISH, ...).
//! - [`Plan::Split`]: MGET, MSET, DEL, UNLINK, EXISTS, TOUCH over several
//!   slots -> one command per slot, replies merged in the client's order.
//! - [`Plan::FanOut`]: "the whole database" (DBSIZE, KEYS, SCAN, RANDOMKEY,
//!   FLUSHALL/FLUSHDB, SCRIPT LOAD|EXISTS|FLUSH, FUNCTION LOAD|DELETE|FLUSH)
//!   -> every primary, replies merged as a single Redis would answer.
//! - [`Plan::Refuse`]: other commands over several slots get Redis's
//!   `CROSSSLOT`; `CLUSTER ...` gets what a non-cluster Redis says.

use crate::command::keys::{self, Keys};
use crate::command::{Commands, Fan, Merge};
use bytes::Bytes;

/// One part of a split command: its own command bytes, and which of the
/// client's keys (by position among the keys) it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub slot: u16,
    pub bytes: Bytes,
    pub keys: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    Slot(u16),
    Any,
    Split {
        merge: Merge,
        parts: Vec<Part>,
        keys: usize,
    },
    FanOut(Fan),
    Refuse(Bytes),
}

pub const CROSSSLOT: &str = "CROSSSLOT Keys in request don't hash to the same slot";

/// Decide where `args` (a whole command, name first) goes.
pub fn plan(table: &Commands, args: &[&[u8]]) -> Plan {
    let Some(name) = args.first() else {
        return Plan::Any;
    };
    if name.eq_ignore_ascii_case(b"CLUSTER") {
        return Plan::Refuse(crate::resp::error(
            "ERR This instance has cluster support disabled",
        ));
    }
    if let Some(f) = table.fan(args) {
        return Plan::FanOut(f);
    }
    let positions = match table.keys(args) {
        Keys::None | Keys::Unreadable => return Plan::Any,
        Keys::At(p) => p,
    };
    match keys::common_slot(args, &positions) {
        Ok(Some(s)) => Plan::Slot(s),
        Ok(None) => Plan::Any,
        Err(keys::CrossSlot) => match table.split(name) {
            Some((merge, width)) => split(args, &positions, merge, width),
            None => Plan::Refuse(crate::resp::error(CROSSSLOT)),
        },
    }
}

/// One command per slot, keys (with their values for MSET) in client order.
fn split(args: &[&[u8]], positions: &[usize], merge: Merge, width: usize) -> Plan {
    let mut slots: Vec<(u16, Vec<usize>)> = Vec::new();
    for (i, &p) in positions.iter().enumerate() {
        let s = keys::slot(args[p]);
        match slots.iter_mut().find(|(x, _)| *x == s) {
            Some((_, v)) => v.push(i),
            None => slots.push((s, vec![i])),
        }
    }
    let parts = slots
        .into_iter()
        .map(|(slot, ks)| {
            let mut part: Vec<&[u8]> = vec![args[0]];
            for &k in &ks {
                let p = positions[k];
                for w in 0..width {
                    if let Some(a) = args.get(p + w) {
                        part.push(a);
                    }
                }
            }
            Part {
                slot,
                bytes: crate::resp::command(&part),
                keys: ks,
            }
        })
        .collect();
    Plan::Split {
        merge,
        parts,
        keys: positions.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(line: &str) -> Plan {
        let args: Vec<&[u8]> = line.split(' ').map(str::as_bytes).collect();
        plan(&Commands::builtin(), &args)
    }

    #[test]
    fn single_slot_and_keyless() {
        assert_eq!(p("GET foo"), Plan::Slot(12182));
        assert_eq!(p("MGET {t}a {t}b"), Plan::Slot(keys::slot(b"t")));
        assert_eq!(p("EVAL s 2 {t}a {t}b"), Plan::Slot(keys::slot(b"t")));
        assert_eq!(p("EVAL s 0"), Plan::Any);
        assert_eq!(p("PING"), Plan::Any);
        assert_eq!(p("PUBLISH c m"), Plan::Any);
        assert_eq!(p("SPUBLISH foo m"), Plan::Slot(12182));
        assert_eq!(p("INFO"), Plan::FanOut(Fan::Info));
        assert_eq!(p("INFO server keyspace"), Plan::FanOut(Fan::Info));
        assert_eq!(p("INFO server"), Plan::Any);
        assert_eq!(p("XREAD STREAMS a"), Plan::Any);
    }

    #[test]
    fn cross_slot_split_or_refused() {
        let Plan::Split { merge, parts, keys } = p("MSET a 1 b 2 {a}c 3") else {
            panic!("split")
        };
        assert_eq!((merge, keys), (Merge::Ok, 3));
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].keys, vec![0, 2]);
        assert_eq!(
            &parts[0].bytes[..],
            &crate::resp::command(&[b"MSET", b"a", b"1", b"{a}c", b"3"])[..]
        );
        assert_eq!(parts[1].slot, keys::slot(b"b"));
        let Plan::Split { merge, parts, .. } = p("del x y z") else {
            panic!("split")
        };
        assert_eq!(merge, Merge::Sum);
        assert_eq!(parts.len(), 3);
        assert!(matches!(
            p("MGET a b"),
            Plan::Split {
                merge: Merge::Array,
                ..
            }
        ));
        for refused in [
            "MSETNX a 1 b 2",
            "SUNION a b",
            "RENAME a b",
            "EVAL s 2 a b",
            "BLPOP a b 0",
        ] {
            assert_eq!(
                p(refused),
                Plan::Refuse(crate::resp::error(CROSSSLOT)),
                "{refused}"
            );
        }
    }

    #[test]
    fn whole_database_commands_fan_out() {
        assert_eq!(p("DBSIZE"), Plan::FanOut(Fan::Sum));
        assert_eq!(p("keys *"), Plan::FanOut(Fan::Concat));
        assert_eq!(p("SCAN 0 COUNT 10"), Plan::FanOut(Fan::Scan));
        assert_eq!(p("FLUSHALL ASYNC"), Plan::FanOut(Fan::AllOk));
        assert_eq!(p("script load x"), Plan::FanOut(Fan::Same));
        assert_eq!(p("SCRIPT EXISTS a b"), Plan::FanOut(Fan::And));
        assert_eq!(p("FUNCTION DELETE lib"), Plan::FanOut(Fan::AllOk));
        assert_eq!(p("RANDOMKEY"), Plan::FanOut(Fan::Random));
        assert_eq!(p("FUNCTION LIST"), Plan::Any);
        assert!(matches!(p("CLUSTER SLOTS"), Plan::Refuse(_)));
    }

    #[test]
    fn a_command_only_the_server_knows_goes_by_its_keys() {
        // A module command with its keys at 1, 3, 5 (first 1, last -1, step 2).
        let reply = b"*1\r\n*10\r\n$8\r\nmymod.mk\r\n:-2\r\n*1\r\n+write\r\n\
            :1\r\n:-1\r\n:2\r\n*0\r\n*0\r\n*0\r\n*0\r\n";
        let learned = Commands::from_command_reply(reply).expect("parses");
        let args: [&[u8]; 5] = [b"MYMOD.MK", b"{t}a", b"1", b"{t}b", b"2"];
        assert_eq!(plan(&learned, &args), Plan::Slot(keys::slot(b"t")));
        let args: [&[u8]; 5] = [b"MYMOD.MK", b"a", b"1", b"b", b"2"];
        assert_eq!(
            plan(&learned, &args),
            Plan::Refuse(crate::resp::error(CROSSSLOT))
        );
        // Without the server's table: no keys known, any node.
        assert_eq!(plan(&Commands::builtin(), &args), Plan::Any);
    }
}
