//! How a command spreads over a cluster's primaries when its keys do not
//! all live in one slot, or when it means "the whole database": which
//! commands the proxy splits per slot, which it sends to every primary, and
//! how their replies are put back together ([`Merge`], [`Fan`]). Facts about
//! commands, read by the cluster router ([`crate::upstream::cluster::route`])
//! through [`super::Commands`]; the merging itself is
//! [`crate::upstream::cluster::merge`].

/// How the replies of a split command are put back together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merge {
    /// MGET: one array, elements in the order of the client's keys.
    Array,
    /// MSET: `+OK` when every part said so.
    Ok,
    /// DEL, UNLINK, EXISTS, TOUCH: the sum of the integers.
    Sum,
}

/// Commands sent to every primary, and how their replies merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fan {
    /// DBSIZE: sum.
    Sum,
    /// KEYS: one array of all.
    Concat,
    /// FLUSHALL, FLUSHDB, SCRIPT FLUSH, FUNCTION FLUSH/DELETE: `+OK` from all.
    AllOk,
    /// SCRIPT LOAD, FUNCTION LOAD: every node must agree; the first reply.
    Same,
    /// SCRIPT EXISTS: 1 where every node has the script.
    And,
    /// RANDOMKEY: a key from a node that has one, chosen at random.
    Random,
    /// INFO with its keyspace section: that section summed.
    Info,
    /// SCAN: one run of slots at a time, the run in the cursor.
    Scan,
}

/// Commands split across slots, with how many arguments each key carries.
pub(super) fn split_kind(name: &[u8]) -> Option<(Merge, usize)> {
    let n = name.to_ascii_uppercase();
    Some(match &n[..] {
        b"MGET" => (Merge::Array, 1),
        b"MSET" => (Merge::Ok, 2),
        b"DEL" | b"UNLINK" | b"EXISTS" | b"TOUCH" => (Merge::Sum, 1),
        _ => return None,
    })
}

/// Commands sent to every primary (`args[0]` is the name).
pub(super) fn fan_kind(args: &[&[u8]]) -> Option<Fan> {
    let name = args.first()?.to_ascii_uppercase();
    let sub = args.get(1).map(|s| s.to_ascii_uppercase());
    let sub = sub.as_deref();
    Some(match (&name[..], sub) {
        (b"DBSIZE", _) => Fan::Sum,
        (b"KEYS", _) => Fan::Concat,
        (b"SCAN", _) => Fan::Scan,
        (b"RANDOMKEY", _) => Fan::Random,
        (b"INFO", _) if info_has_keyspace(&args[1..]) => Fan::Info,
        (b"FLUSHALL" | b"FLUSHDB", _) => Fan::AllOk,
        (b"SCRIPT", Some(b"LOAD")) => Fan::Same,
        (b"SCRIPT", Some(b"EXISTS")) => Fan::And,
        (b"SCRIPT", Some(b"FLUSH")) => Fan::AllOk,
        (b"FUNCTION", Some(b"LOAD")) => Fan::Same,
        (b"FUNCTION", Some(b"DELETE" | b"FLUSH")) => Fan::AllOk,
        _ => return None,
    })
}

/// Whether INFO with these sections shows `# Keyspace`.
fn info_has_keyspace(sections: &[&[u8]]) -> bool {
    sections.is_empty()
        || sections.iter().any(|s| {
            [&b"keyspace"[..], b"all", b"everything", b"default"]
                .iter()
                .any(|k| s.eq_ignore_ascii_case(k))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds() {
        assert_eq!(split_kind(b"mset"), Some((Merge::Ok, 2)));
        assert_eq!(split_kind(b"MSETNX"), None);
        assert_eq!(fan_kind(&[b"info", b"Keyspace"]), Some(Fan::Info));
        assert_eq!(fan_kind(&[b"INFO", b"memory"]), None);
        assert_eq!(fan_kind(&[b"SCRIPT"]), None);
        assert_eq!(fan_kind(&[]), None);
    }
}
