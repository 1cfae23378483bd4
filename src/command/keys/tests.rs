use super::*;
use crate::command::Commands;

fn keys(t: &Commands, line: &str) -> Keys {
    let args: Vec<&[u8]> = line.split(' ').map(str::as_bytes).collect();
    t.keys(&args)
}

#[test]
fn slots_match_redis_cluster() {
    // The CRC16/XMODEM check value, and slots Redis documents.
    assert_eq!(crc16(b"123456789"), 0x31C3);
    assert_eq!(slot(b"foo"), 12182);
    assert_eq!(slot(b"somekey"), 11058);
    assert_eq!(slot(b"hello"), 866);
    // Hash tags: the first {...} with something inside.
    assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
    assert_eq!(slot(b"{user1000}.followers"), slot(b"user1000"));
    assert_eq!(slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % SLOTS);
    assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
    assert_eq!(slot(b"foo{bar}{zap}"), slot(b"bar"));
    assert_eq!(slot(b"{"), crc16(b"{") % SLOTS);
    assert_eq!(slot(b""), 0);
    // Any bytes at all: no panic, always in range.
    for i in 0..2000u32 {
        let k = i.to_le_bytes();
        assert!(slot(&k) < SLOTS);
    }
}

#[test]
fn fixed_positions() {
    let t = Commands::builtin();
    assert_eq!(keys(&t, "GET a"), Keys::At(vec![1]));
    assert_eq!(keys(&t, "mget a b c"), Keys::At(vec![1, 2, 3]));
    assert_eq!(keys(&t, "MSET a 1 b 2"), Keys::At(vec![1, 3]));
    assert_eq!(keys(&t, "BLPOP a b 0"), Keys::At(vec![1, 2]));
    assert_eq!(keys(&t, "RENAME a b"), Keys::At(vec![1, 2]));
    assert_eq!(keys(&t, "BITOP AND d a b"), Keys::At(vec![2, 3, 4]));
    assert_eq!(keys(&t, "PING"), Keys::None);
    assert_eq!(keys(&t, "PUBLISH ch m"), Keys::None);
    assert_eq!(keys(&t, "GET"), Keys::Unreadable);
    assert_eq!(keys(&t, "OBJECT ENCODING k"), Keys::At(vec![2]));
    assert_eq!(keys(&t, "MEMORY USAGE k SAMPLES 5"), Keys::At(vec![2]));
    assert_eq!(keys(&t, "MEMORY STATS"), Keys::None);
    assert_eq!(keys(&t, "XINFO STREAM s"), Keys::At(vec![2]));
    assert_eq!(keys(&t, "OBJECT"), Keys::None);
}

#[test]
fn movable_keys() {
    let t = Commands::builtin();
    assert_eq!(keys(&t, "EVAL s 2 a b x"), Keys::At(vec![3, 4]));
    assert_eq!(keys(&t, "EVALSHA s 0"), Keys::At(vec![]));
    assert_eq!(keys(&t, "FCALL_RO f 1 a"), Keys::At(vec![3]));
    assert_eq!(keys(&t, "EVAL s 3 a"), Keys::Unreadable);
    assert_eq!(keys(&t, "EVAL s x a"), Keys::Unreadable);
    assert_eq!(
        keys(&t, "EVAL s 99999999999999999999999 a"),
        Keys::Unreadable
    );
    assert_eq!(
        keys(&t, "XREAD COUNT 2 STREAMS a b 0 0"),
        Keys::At(vec![4, 5])
    );
    assert_eq!(
        keys(&t, "XREADGROUP GROUP g c BLOCK 0 STREAMS a >"),
        Keys::At(vec![7])
    );
    assert_eq!(keys(&t, "XREAD STREAMS a b 0"), Keys::Unreadable);
    assert_eq!(keys(&t, "XREAD COUNT 1"), Keys::Unreadable);
    assert_eq!(keys(&t, "ZUNION 2 a b WITHSCORES"), Keys::At(vec![2, 3]));
    assert_eq!(keys(&t, "ZUNIONSTORE d 2 a b"), Keys::At(vec![1, 3, 4]));
    assert_eq!(keys(&t, "ZDIFFSTORE d 1 a"), Keys::At(vec![1, 3]));
    assert_eq!(keys(&t, "SINTERCARD 2 a b LIMIT 1"), Keys::At(vec![2, 3]));
    assert_eq!(keys(&t, "LMPOP 2 a b LEFT"), Keys::At(vec![2, 3]));
    assert_eq!(keys(&t, "BLMPOP 0 2 a b LEFT"), Keys::At(vec![3, 4]));
    assert_eq!(keys(&t, "BZMPOP 1.5 1 z MIN"), Keys::At(vec![3]));
    assert_eq!(keys(&t, "SORT a LIMIT 0 1 STORE d"), Keys::At(vec![1, 6]));
    assert_eq!(keys(&t, "SORT_RO a ALPHA"), Keys::At(vec![1]));
    assert_eq!(
        keys(&t, "GEORADIUS g 0 0 1 km STORE d STOREDIST e"),
        Keys::At(vec![1, 7, 9])
    );
    assert_eq!(keys(&t, "MIGRATE h 1 k 0 5"), Keys::At(vec![3]));
    assert_eq!(
        keys(&t, "MIGRATE h 1  0 5 COPY KEYS a b"),
        Keys::At(vec![8, 9])
    );
}

#[test]
fn table_from_the_servers_command_reply() {
    // COMMAND's shape: name, arity, flags, first, last, step, ACL categories,
    // tips, key specs, subcommands (each of the same shape).
    let reply = b"*3\r\n\
        *10\r\n$3\r\nget\r\n:2\r\n*1\r\n+readonly\r\n:1\r\n:1\r\n:1\r\n*0\r\n*0\r\n*0\r\n*0\r\n\
        *10\r\n$8\r\nmymod.mk\r\n:-2\r\n*1\r\n+write\r\n:1\r\n:-1\r\n:2\r\n*0\r\n*0\r\n*0\r\n*0\r\n\
        *10\r\n$6\r\nobject\r\n:-2\r\n*0\r\n:0\r\n:0\r\n:0\r\n*0\r\n*0\r\n*0\r\n\
        *1\r\n*10\r\n$11\r\nobject|info\r\n:3\r\n*0\r\n:2\r\n:2\r\n:1\r\n*0\r\n*0\r\n*0\r\n*0\r\n";
    let t = Commands::from_command_reply(reply).expect("parses");
    assert!(t.is_complete());
    assert_eq!(keys(&t, "MYMOD.MK a 1 b 2 c"), Keys::At(vec![1, 3, 5]));
    // Subcommands of containers not in the built-in list come from the reply.
    assert_eq!(keys(&t, "object info k"), Keys::At(vec![2]));
    assert!(Commands::from_command_reply(b"-NOPERM x\r\n").is_none());
    assert!(Commands::from_command_reply(b"*1\r\n:1\r\n").is_some());
}

#[test]
fn common_slot_and_crossslot() {
    let args: Vec<&[u8]> = vec![b"MGET", b"{t}a", b"{t}b", b"c"];
    assert_eq!(common_slot(&args, &[1, 2]), Ok(Some(slot(b"t"))));
    assert_eq!(common_slot(&args, &[1, 2, 3]), Err(CrossSlot));
    assert_eq!(common_slot(&args, &[]), Ok(None));
}
