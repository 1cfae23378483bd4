use super::*;
use crate::command::{Local, PubSub};

/// One `COMMAND` entry as Redis 7 sends it in RESP2: name, arity, flags,
/// first key, last key, step, ACL categories, tips, key specs, subcommands.
fn entry(name: &str, arity: i64, flags: &[&str], keys: (i64, i64, i64), subs: &[String]) -> String {
    let mut s = format!(
        "*10\r\n${}\r\n{name}\r\n:{arity}\r\n*{}\r\n",
        name.len(),
        flags.len()
    );
    for f in flags {
        s += &format!("+{f}\r\n");
    }
    let (first, last, step) = keys;
    s += &format!(
        ":{first}\r\n:{last}\r\n:{step}\r\n*0\r\n*0\r\n*0\r\n*{}\r\n",
        subs.len()
    );
    s.extend(subs.iter().map(String::as_str));
    s
}

fn table(entries: &[String]) -> Commands {
    let reply = format!("*{}\r\n{}", entries.len(), entries.concat());
    Commands::from_command_reply(reply.as_bytes()).expect("parses")
}

const NONE: (i64, i64, i64) = (0, 0, 0);

/// Part of what Redis 7.0 lists: no CLIENT SETINFO (7.2), a module command
/// that blocks and has a key, a command newer than the built-in key table.
fn redis_7_0() -> Commands {
    let client_subs: Vec<String> = [("id", 2), ("getname", 2), ("setname", 3), ("reply", 3)]
        .iter()
        .map(|(sub, arity)| {
            entry(
                &format!("client|{sub}"),
                *arity,
                &["noscript", "loading"],
                NONE,
                &[],
            )
        })
        .collect();
    table(&[
        entry("get", 2, &["readonly", "fast"], (1, 1, 1), &[]),
        entry("set", -3, &["write", "denyoom"], (1, 1, 1), &[]),
        entry("lcs", -3, &["readonly"], (1, 2, 1), &[]),
        entry(
            "multi",
            1,
            &["noscript", "loading", "stale", "fast"],
            NONE,
            &[],
        ),
        entry(
            "reset",
            1,
            &["noscript", "loading", "stale", "fast"],
            NONE,
            &[],
        ),
        entry("subscribe", -2, &["pubsub", "noscript"], NONE, &[]),
        entry("client", -2, &[], NONE, &client_subs),
        entry("mymod.bget", -3, &["readonly", "blocking"], (1, 1, 1), &[]),
    ])
}

fn at(v: &[usize]) -> Keys {
    Keys::At(v.to_vec())
}

#[test]
fn one_reply_gives_arity_keys_and_flags() {
    let c = redis_7_0();
    assert!(c.is_complete());
    assert_eq!(c.known, 8);
    // Arity, from the one parse...
    assert_eq!(c.refuses(&[b"GET", b"k"], 2), None);
    assert_eq!(c.refuses(&[b"GET"], 1), Some(Refusal::WrongArity));
    assert_eq!(c.refuses(&[b"NOSUCH"], 1), Some(Refusal::UnknownCommand));
    assert_eq!(
        c.refuses(&[b"client", b"ID", b"x"], 3),
        Some(Refusal::WrongArity)
    );
    // ...keys, from the same...
    assert_eq!(c.keys(&[b"GET", b"k"]), at(&[1]));
    assert_eq!(c.keys(&[b"LCS", b"a", b"b"]), at(&[1, 2]));
    assert_eq!(Commands::builtin().keys(&[b"LCS", b"a", b"b"]), Keys::None);
    // ...the built-in positions where the server listed none...
    assert_eq!(c.keys(&[b"MGET", b"a", b"b"]), at(&[1, 2]));
    assert_eq!(c.keys(&[b"EVAL", b"s", b"1", b"k"]), at(&[3]));
    // ...and flags, a subcommand's its own.
    assert!(c
        .flags(&[b"get", b"k"])
        .contains(Flags::READONLY | Flags::FAST));
    assert!(c.flags(&[b"SET", b"k", b"v"]).contains(Flags::WRITE));
    assert!(!c.flags(&[b"SET", b"k", b"v"]).contains(Flags::READONLY));
    assert!(c.flags(&[b"CLIENT", b"ID"]).contains(Flags::NOSCRIPT));
    assert!(c.flags(&[b"SUBSCRIBE", b"c"]).contains(Flags::PUBSUB));
    assert_eq!(c.flags(&[b"NOSUCH"]), Flags::default());
    assert_eq!(Commands::builtin().flags(&[b"GET", b"k"]), Flags::default());
    assert_eq!(c.full_name(&[b"CLIENT", b"GetName"]), "client|getname");
}

#[test]
fn a_command_only_the_server_knows_routes_by_its_flags_and_keys() {
    let c = redis_7_0();
    let bget: &[&[u8]] = &[b"MYMOD.BGET", b"k", b"0"];
    assert_eq!(c.class(bget), Class::Pin(Pin::Blocking));
    assert_eq!(c.judge(bget, 3, false), Class::Pin(Pin::Blocking));
    assert_eq!(c.keys(bget), at(&[1]));
    assert!(c.flags(bget).contains(Flags::BLOCKING));
    assert_eq!(c.blocking, vec![b"mymod.bget".to_vec()]);
    // Its arity is the server's too.
    assert_eq!(c.judge(&[b"MYMOD.BGET", b"k"], 2, false), Class::Invalid);
    // Without the server's table it is a plain shared command with no keys.
    let b = Commands::builtin();
    assert_eq!(b.class(bget), Class::Shared);
    assert_eq!(b.keys(bget), Keys::None);
    // What the table knows stays the table's.
    assert_eq!(
        c.class(&[b"SUBSCRIBE", b"c"]),
        Class::PubSub(PubSub::Subscribe)
    );
    assert_eq!(c.class(&[b"GET", b"k"]), Class::Shared);
}

#[test]
fn a_server_without_a_command_the_proxy_knows() {
    // CLIENT SETINFO came with Redis 7.2: a 7.0 server refuses it as an
    // unknown subcommand, and so the proxy sends it there for that error.
    let setinfo: &[&[u8]] = &[b"CLIENT", b"SETINFO", b"lib-name", b"x"];
    let c = redis_7_0();
    assert_eq!(c.refuses(setinfo, 4), Some(Refusal::UnknownSubcommand));
    assert_eq!(c.judge(setinfo, 4, false), Class::Invalid);
    let b = Commands::builtin();
    assert_eq!(
        b.judge(setinfo, 4, false),
        Class::Local(Local::ClientSetInfo)
    );
    // Redis 6.0: no RESET, no subcommand entries (CLIENT judged as a whole).
    let six = table(&[
        entry("get", 2, &["readonly"], (1, 1, 1), &[]),
        entry("client", -2, &["admin"], NONE, &[]),
    ]);
    assert_eq!(six.judge(&[b"RESET"], 1, false), Class::Invalid);
    assert_eq!(b.judge(&[b"RESET"], 1, false), Class::Local(Local::Reset));
    assert_eq!(
        six.judge(&[b"CLIENT", b"SETNAME", b"n"], 3, false),
        Class::Local(Local::ClientSetName)
    );
    assert_eq!(six.full_name(&[b"CLIENT", b"SETNAME"]), "client");
    // A plain command is the server's to judge, unless the proxy answers it.
    assert_eq!(six.judge(&[b"GET"], 1, false), Class::Shared);
    assert_eq!(six.judge(&[b"GET"], 1, true), Class::Invalid);
    // What the proxy refuses is refused, whatever its arity.
    assert_eq!(
        six.judge(&[b"SYNC", b"x"], 2, false),
        Class::Refuse(refusal::REPLICATION)
    );
}

#[test]
fn learned_blocking_commands_are_pinned() {
    // The shape of COMMAND's reply in RESP2 (flags an array) and RESP3 (a set).
    let resp2 = b"*3\r\n\
        *3\r\n$3\r\nget\r\n:2\r\n*2\r\n+readonly\r\n+fast\r\n\
        *3\r\n$5\r\nblpop\r\n:-3\r\n*2\r\n+write\r\n+blocking\r\n\
        *3\r\n$11\r\nmymod.bwait\r\n:-2\r\n*2\r\n+readonly\r\n+blocking\r\n";
    let l = Commands::from_command_reply(resp2).expect("parses");
    assert_eq!(l.known, 3);
    // BLPOP is in the table already; only the module command is new.
    assert_eq!(l.blocking, vec![b"mymod.bwait".to_vec()]);
    assert_eq!(l.refine(b"MYMOD.BWAIT"), Class::Pin(Pin::Blocking));
    assert_eq!(l.refine(b"GET"), Class::Shared);
    // A module command that could change a connection's mode: refused.
    let pubsub = b"*2\r\n*3\r\n$7\r\nx.psub2\r\n:-2\r\n*2\r\n+pubsub\r\n+noscript\r\n\
        *3\r\n$7\r\npublish\r\n:3\r\n*2\r\n+pubsub\r\n+fast\r\n";
    let l = Commands::from_command_reply(pubsub).expect("parses");
    assert_eq!(l.unplaced, vec![b"x.psub2".to_vec()]);
    assert_eq!(l.refine(b"X.PSUB2"), Class::Refuse(refusal::UNPLACED));
    assert_eq!(
        l.class(&[b"x.psub2", b"c"]),
        Class::Refuse(refusal::UNPLACED)
    );
    assert_eq!(l.refine(b"PUBLISH"), Class::Shared);
    let resp3 = b"*1\r\n*3\r\n$6\r\nx.wait\r\n:-2\r\n~1\r\n+blocking\r\n";
    let l = Commands::from_command_reply(resp3).expect("parses");
    assert_eq!(l.blocking, vec![b"x.wait".to_vec()]);
    assert!(Commands::from_command_reply(b"-NOPERM no\r\n").is_none());
    assert_eq!(Commands::builtin().refine(b"anything"), Class::Shared);
    // XREAD blocks only with BLOCK: the table decides it by its arguments.
    let xread = b"*1\r\n*3\r\n$5\r\nxread\r\n:-4\r\n*1\r\n+blocking\r\n";
    assert!(Commands::from_command_reply(xread)
        .unwrap()
        .blocking
        .is_empty());
}

#[test]
fn arities_come_from_the_servers_table() {
    // GET, and CLIENT with one subcommand (Redis 7's tenth field).
    let reply = b"*2\r\n\
        *3\r\n$3\r\nget\r\n:2\r\n*1\r\n+readonly\r\n\
        *10\r\n$6\r\nclient\r\n:-2\r\n*0\r\n:0\r\n:0\r\n:0\r\n*0\r\n*0\r\n*0\r\n\
        *1\r\n*3\r\n$14\r\nclient|getname\r\n:2\r\n*0\r\n";
    let l = Commands::from_command_reply(reply).expect("parses");
    let refuses = |args: &[&[u8]]| l.refuses(args, args.len());
    assert_eq!(refuses(&[b"GET", b"k"]), None);
    assert_eq!(refuses(&[b"GET"]), Some(Refusal::WrongArity));
    assert_eq!(refuses(&[b"MULTI"]), Some(Refusal::UnknownCommand));
    assert_eq!(refuses(&[b"CLIENT", b"GETNAME"]), None);
    assert_eq!(
        refuses(&[b"CLIENT", b"GETNAME", b"x"]),
        Some(Refusal::WrongArity)
    );
    assert_eq!(
        refuses(&[b"CLIENT", b"SETINFO", b"a", b"b"]),
        Some(Refusal::UnknownSubcommand)
    );
    assert_eq!(refuses(&[b"CLIENT"]), Some(Refusal::WrongArity));
    assert_eq!(refuses(&[]), None);
    // Only the first words are kept of a long command: argc counts all.
    assert_eq!(l.refuses(&[b"GET"], 2), None);
    assert_eq!(l.full_name(&[b"client", b"GETNAME"]), "client|getname");
    // No table from the server: the built-in one for the proxy's own.
    let b = Commands::or_builtin(None);
    assert_eq!(b.refuses(&[b"MULTI", b"x"], 2), Some(Refusal::WrongArity));
    assert_eq!(b.refuses(&[b"NOSUCH"], 1), None);
    // A reply that lists no arity leaves the built-in ones judging.
    let odd = Commands::from_command_reply(b"*1\r\n:1\r\n").expect("parses");
    assert!(!odd.is_complete());
    assert_eq!(odd.refuses(&[b"MULTI", b"x"], 2), Some(Refusal::WrongArity));
}

#[test]
fn the_proxys_own_commands() {
    let a = Commands::builtin();
    let check = |args: &[&[u8]]| a.refuses(args, args.len());
    assert_eq!(check(&[b"MULTI"]), None);
    assert_eq!(check(&[b"multi", b"x"]), Some(Refusal::WrongArity));
    assert_eq!(check(&[b"RESET", b"x"]), Some(Refusal::WrongArity));
    assert_eq!(check(&[b"DISCARD", b"x"]), Some(Refusal::WrongArity));
    assert_eq!(check(&[b"EXEC", b"x"]), Some(Refusal::WrongArity));
    assert_eq!(check(&[b"UNWATCH", b"x"]), Some(Refusal::WrongArity));
    assert_eq!(check(&[b"SELECT"]), Some(Refusal::WrongArity));
    assert_eq!(check(&[b"SELECT", b"1"]), None);
    assert_eq!(check(&[b"WATCH"]), Some(Refusal::WrongArity));
    assert_eq!(check(&[b"WATCH", b"a", b"b"]), None);
    assert_eq!(check(&[b"CLIENT", b"ID", b"x"]), Some(Refusal::WrongArity));
    assert_eq!(check(&[b"client", b"id"]), None);
    assert_eq!(check(&[b"CLIENT"]), Some(Refusal::WrongArity));
    assert_eq!(check(&[b"SUBSCRIBE"]), Some(Refusal::WrongArity));
    assert_eq!(check(&[b"UNSUBSCRIBE"]), None);
    // The built-in table does not know everything: it judges nothing else.
    assert_eq!(check(&[b"GET"]), None);
    assert_eq!(check(&[b"CLIENT", b"NOSUCH"]), None);
    assert_eq!(a.full_name(&[b"CLIENT", b"GetName"]), "client|getname");
    assert_eq!(a.full_name(&[b"CLIENT", b"nosuch"]), "client");
    assert_eq!(a.full_name(&[b"GET", b"k"]), "get");
    assert!(!a.is_complete());
}

#[test]
fn what_the_proxy_answers_as_itself_is_judged_as_redis_7_0_judges_it() {
    let f = Commands::face();
    let face = Class::Local(Local::Face);
    let judge = |args: &[&[u8]]| f.judge_face(args, args.len());
    assert_eq!(judge(&[b"CLUSTER", b"SLOTS"]), face);
    assert_eq!(judge(&[b"INFO", b"a", b"b"]), face);
    assert_eq!(judge(&[b"CLUSTER", b"MEET", b"h", b"1"]), face);
    let wrong = Class::Rejected(Refusal::WrongArity);
    assert_eq!(judge(&[b"CLUSTER", b"slots", b"x"]), wrong);
    assert_eq!(judge(&[b"cluster"]), wrong);
    assert_eq!(judge(&[b"CLUSTER", b"MEET"]), wrong);
    assert_eq!(judge(&[b"READONLY", b"x"]), wrong);
    let unknown = Class::Rejected(Refusal::UnknownSubcommand);
    assert_eq!(judge(&[b"CLUSTER", b"nosuch"]), unknown);
    assert_eq!(judge(&[b"CLIENT", b"MAINT_NOTIFICATIONS", b"on"]), unknown);
    // In Redis's words (compared with redis-server 7.0.15).
    assert_eq!(
        f.refusal_text(Refusal::WrongArity, &[b"CLUSTER", b"Slots", b"x"]),
        "ERR wrong number of arguments for 'cluster|slots' command"
    );
    assert_eq!(
        f.refusal_text(
            Refusal::UnknownSubcommand,
            &[b"client", b"maint_notifications", b"on"]
        ),
        "ERR unknown subcommand 'maint_notifications'. Try CLIENT HELP."
    );
    assert_eq!(
        f.refusal_text(Refusal::UnknownCommand, &[b"nosuch", b"a", b"b"]),
        "ERR unknown command 'nosuch', with args beginning with: 'a' 'b' "
    );
    let long = vec![b'x'; 300];
    let text = f.refusal_text(Refusal::UnknownCommand, &[b"nosuch", &long, b"b"]);
    assert_eq!(text.matches('x').count(), 128, "{text}");
    assert!(!text.contains("'b'"), "{text}");
}
