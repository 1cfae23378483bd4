//! The failover front of the tests (tests/common/front.rs) as a process, for
//! `scripts/failover-lab.sh`: passes TCP (TLS untouched) from `--port` to the
//! server it routes to, and takes one command a line on stdin:
//!
//! - `close`: close every connection through it
//! - `refuse`: refuse new connections (until `accept`)
//! - `accept`: accept again
//! - `route PORT`: new connections go to PORT
//!
//! `cargo run --example failover_front -- --port P --target T`

#[path = "../tests/common/front.rs"]
#[allow(dead_code)]
mod front;

use std::io::BufRead;

fn main() {
    let mut port = 0u16;
    let mut target = 0u16;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().and_then(|v| v.parse().ok());
        match (a.as_str(), v) {
            ("--port", Some(v)) => port = v,
            ("--target", Some(v)) => target = v,
            _ => {
                eprintln!("usage: failover_front --port P --target T");
                std::process::exit(2);
            }
        }
    }
    let f = front::Front::start(port, target);
    println!("listening {}", f.port);
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["close"] => println!("closed {}", f.close_all()),
            ["refuse"] => {
                f.refuse();
                println!("refusing");
            }
            ["accept"] => {
                f.accept();
                println!("accepting");
            }
            ["route", p] => match p.parse() {
                Ok(p) => {
                    f.route(p);
                    println!("routing to {p}");
                }
                Err(_) => println!("bad port {p}"),
            },
            [] => {}
            _ => println!("unknown command: {line}"),
        }
    }
}
