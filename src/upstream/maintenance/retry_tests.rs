use super::*;
use crate::resp::command;
use InFlight::*;

#[test]
fn reads_are_read_only_and_writes_blocking_and_scripts_are_not() {
    for c in [
        "GET", "get", "MGET", "HGETALL", "ZRANGE", "SCAN", "EVAL_RO", "FCALL_RO", "PING",
    ] {
        assert!(read_only(c.as_bytes()), "{c}");
    }
    for c in [
        "SET",
        "INCR",
        "DEL",
        "EXPIRE",
        "GETEX",
        "GETDEL",
        "BLPOP",
        "BRPOP",
        "BZPOPMIN",
        "XREAD",
        "XREADGROUP",
        "EVAL",
        "EVALSHA",
        "FCALL",
        "MULTI",
        "EXEC",
        "WATCH",
        "PFCOUNT",
        "SORT",
        "PUBLISH",
        "WAIT",
        "CLIENT",
        "SELECT",
        "",
        "GETX",
    ] {
        assert!(!read_only(c.as_bytes()), "{c}");
    }
}

#[test]
fn a_request_is_read_only_when_every_command_in_it_is() {
    assert!(request_read_only(&command(&[b"GET", b"k"])));
    let mut two = command(&[b"GET", b"a"]).to_vec();
    two.extend_from_slice(&command(&[b"MGET", b"a", b"b"]));
    assert!(request_read_only(&two));
    let mut mixed = command(&[b"GET", b"a"]).to_vec();
    mixed.extend_from_slice(&command(&[b"INCR", b"a"]));
    assert!(!request_read_only(&mixed));
    assert!(!request_read_only(&command(&[b"SET", b"k", b"v"])));
    // A value that looks like a read changes nothing: the name is what counts.
    assert!(!request_read_only(&command(&[b"SET", b"GET", b"GET"])));
}

#[test]
fn what_cannot_be_read_is_not_read_only() {
    for bad in [
        &b""[..],
        b"GET k\r\n",
        b"*1\r\n$3\r\nGET",
        b"*2\r\n$3\r\nGET\r\n",
        b"*1\r\n$3\r\nGETX\r\n",
        b"*0\r\n",
        b"*1\r\n$99999999999999\r\nGET\r\n",
        b"*1\r\n$-1\r\n",
        b"*x\r\n$3\r\nGET\r\n",
    ] {
        assert!(
            !request_read_only(bad),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    // Whatever bytes: no panic.
    let full = command(&[b"GET", b"key"]);
    for n in 0..full.len() {
        let _ = request_read_only(&full[..n]);
    }
}

#[test]
fn safe_commands_are_resent_and_nothing_else() {
    assert_eq!(resend_plan(&[]), Vec::<bool>::new());
    assert_eq!(resend_plan(&[Safe, Safe]), [true, true]);
    assert_eq!(resend_plan(&[Unsafe, Safe]), [false, true]);
    assert_eq!(resend_plan(&[Safe, Unsafe, Safe]), [true, false, true]);
    // The proxy's own PING or AUTH is dropped, never a client's to resend.
    assert_eq!(resend_plan(&[Safe, Own, Safe]), [true, false, true]);
    assert_eq!(resend_plan(&[Own, Unsafe, Own]), [false, false, false]);
}
