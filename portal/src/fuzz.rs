//! Fuzzing of the wire readers: every reader of `postgres`, `resp` and `mysql` (and the
//! pooler's readers of client SQL and extended-protocol messages, which sit on them) is fed
//! hundreds of thousands of inputs made from valid messages by flipping, cutting, inserting
//! and stretching length fields, from a fixed seed so that a failure repeats. A reader must
//! never panic, and what it claims must hold: a frame it finds lies within the buffer, a
//! reply it scans fits, an argument it returns is inside the command.
//!
//! Tests only. May import: `wire` and the pooler's readers (`session::pool`).

use crate::wire::{mysql, postgres as pg, resp};

/// xorshift64*: small, fast and repeatable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// A mutation of `seed`: a few flips, cuts, insertions, or a length field set to an edge.
    fn mutate(&mut self, seed: &[u8]) -> Vec<u8> {
        let mut v = seed.to_vec();
        for _ in 0..1 + self.below(4) {
            match self.below(7) {
                0 if !v.is_empty() => {
                    let i = self.below(v.len());
                    v[i] ^= 1 << self.below(8);
                }
                1 if !v.is_empty() => {
                    let i = self.below(v.len());
                    v[i] = self.next() as u8;
                }
                2 => v.truncate(self.below(v.len() + 1)),
                3 => {
                    let i = self.below(v.len() + 1);
                    let n = self.below(16);
                    let bytes: Vec<u8> = (0..n).map(|_| self.next() as u8).collect();
                    v.splice(i..i, bytes);
                }
                4 if v.len() >= 4 => {
                    let i = self.below(v.len() - 3);
                    let edge =
                        [0u32, 1, 4, 5, 0x7fff_ffff, 0xffff_ffff, 0x8000_0000][self.below(7)];
                    v[i..i + 4].copy_from_slice(&edge.to_be_bytes());
                }
                5 => {
                    let copy = v.clone();
                    v.extend_from_slice(&copy);
                }
                _ => {
                    let b = [b'\r', b'\n', 0, b'*', b'$', b'-', b':'][self.below(7)];
                    let i = self.below(v.len() + 1);
                    v.insert(i, b);
                }
            }
        }
        v
    }
}

const ROUNDS: usize = 60_000;

fn postgres_seeds() -> Vec<Vec<u8>> {
    let mut parse = vec![b's', b'1', 0];
    parse.extend_from_slice(b"SELECT $1\0\0\x01\0\0\0\x17");
    let bind = vec![0u8, b's', b'1', 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, b'7', 0, 0];
    vec![
        pg::startup_message(&[
            ("user", "app"),
            ("database", "db"),
            ("application_name", "x"),
        ]),
        pg::ssl_request().to_vec(),
        pg::cancel_request(7, 9).to_vec(),
        pg::query("SELECT 1; LISTEN x"),
        pg::query_with_param("SELECT passwd FROM pg_shadow WHERE usename = $1", "app"),
        pg::message(b'P', &parse),
        pg::message(b'B', &bind),
        pg::sasl_initial("SCRAM-SHA-256", b"n,,n=,r=abc"),
        pg::authentication(pg::AUTH_SASL, b"SCRAM-SHA-256\0\0"),
        pg::parameter_status("client_encoding", "UTF8"),
        pg::backend_key_data(1, 2),
        pg::error_response("ERROR", "42P01", "no such table"),
        pg::message(b'D', &[0, 2, 0, 0, 0, 1, b'a', 0xff, 0xff, 0xff, 0xff]),
        pg::ready_for_query(pg::ReadyStatus::InTransaction).to_vec(),
    ]
}

/// Every PostgreSQL reader, on one input.
fn postgres_readers(input: &[u8]) {
    if let Ok(Some(n)) = pg::frame(input, 1 << 20) {
        assert!(
            (pg::HEADER_LEN..=input.len()).contains(&n),
            "frame {n} of {}",
            input.len()
        );
        let body = &input[pg::HEADER_LEN..n];
        let _ = pg::parse_authentication(body);
        let _ = pg::parse_sasl_initial(body);
        let _ = pg::parse_parameter_status(body);
        let _ = pg::parse_key(body);
        let _ = pg::error_fields(body);
        let _ = pg::error_text(body);
        if let Some(columns) = pg::data_row(body) {
            let total: usize = columns.iter().flatten().map(|c| c.len()).sum();
            assert!(total <= body.len());
        }
        // What decodes encodes back to the same bytes.
        if let Ok(m) = pg::frontend::Frontend::decode(input[0], body) {
            assert_eq!(m.to_bytes(), &input[..n]);
        }
        if let Ok(m) = pg::backend::Backend::decode(input[0], body) {
            assert_eq!(m.to_bytes(), &input[..n]);
        }
        let _ = crate::session::pool::statements::special(body);
        let pinning = crate::session::pool::pinning::pin_reason(body);
        assert_eq!(pinning, crate::session::pool::pinning::in_full(body));
    }
    if input.len() >= 8 {
        let header: [u8; 8] = input[..8].try_into().expect("8 bytes");
        let _ = pg::startup_header(&header);
        let _ = pg::startup_params(&input[8..]);
    }
    if input.len() >= pg::HEADER_LEN {
        let _ = pg::message_len(input);
    }
    let _ = pg::cstr(input);
    let _ = pg::ReadyStatus::of(input);
}

#[test]
fn postgres_readers_never_panic_and_stay_in_bounds() {
    let seeds = postgres_seeds();
    let mut rng = Rng(0x5eed_0001);
    for _ in 0..ROUNDS {
        let seed = &seeds[rng.below(seeds.len())];
        postgres_readers(&rng.mutate(seed));
    }
    for n in 0..64 {
        let random: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
        postgres_readers(&random);
    }
}

fn resp_seeds() -> Vec<Vec<u8>> {
    let mut set = Vec::new();
    resp::encode(&mut set, &["SET", "key", "value"]);
    vec![
        set,
        b"PING\r\n".to_vec(),
        b"*2\r\n$4\r\nAUTH\r\n$2\r\npw\r\n".to_vec(),
        b"+OK\r\n".to_vec(),
        b"-ERR unknown\r\n".to_vec(),
        b":42\r\n".to_vec(),
        b"$5\r\nhello\r\n".to_vec(),
        b"$-1\r\n".to_vec(),
        b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$1\r\nx\r\n".to_vec(),
        b"%1\r\n+a\r\n:1\r\n".to_vec(),
        b">3\r\n+message\r\n+ch\r\n+x\r\n".to_vec(),
        b"*1\r\n*1\r\n*1\r\n*0\r\n".to_vec(),
        b",3.14\r\n#t\r\n_\r\n(12345678901234567890\r\n".to_vec(),
        b"=15\r\ntxt:Some string\r\n!21\r\nSYNTAX invalid syntax\r\n".to_vec(),
    ]
}

/// Every RESP reader, on one input.
fn resp_readers(input: &[u8], cmd: &mut resp::Command) {
    if let Ok(true) = resp::parse_command(input, cmd) {
        assert!(
            cmd.len <= input.len(),
            "command {} of {}",
            cmd.len,
            input.len()
        );
        for (i, &(s, e)) in cmd.args.iter().enumerate() {
            assert!(
                s <= e && e <= cmd.len,
                "argument {i}: {s}..{e} of {}",
                cmd.len
            );
            let _ = cmd.arg(input, i);
        }
    }
    if let Ok(Some(s)) = resp::scan_reply(input) {
        assert!(
            s.len > 0 && s.len <= input.len(),
            "reply {} of {}",
            s.len,
            input.len()
        );
        let _ = resp::array_head(&input[..s.len]);
    }
}

#[test]
fn resp_readers_never_panic_and_stay_in_bounds() {
    let seeds = resp_seeds();
    let mut rng = Rng(0x5eed_0002);
    let mut cmd = resp::Command::default();
    for _ in 0..ROUNDS {
        let seed = &seeds[rng.below(seeds.len())];
        resp_readers(&rng.mutate(seed), &mut cmd);
    }
    // Deep nesting costs nothing and overflows nothing.
    let deep = "*1\r\n".repeat(100_000);
    assert_eq!(resp::scan_reply(deep.as_bytes()).ok(), Some(None));
    let huge = b"*9223372036854775807\r\n".repeat(4);
    let _ = resp::scan_reply(&huge);
}

#[test]
fn mysql_readers_never_panic() {
    let seeds = [
        mysql::err_payload(1045, "28000", "Access denied"),
        // A server greeting: protocol 10, version, thread id, scramble, capabilities.
        b"\x0a8.0.36\0\x01\0\0\0abcdefgh\0\xff\xf7\x21\x02\0\xff\xc1\x15\0\0\0\0\0\0\0\0\0\0ijklmnopqrst\0mysql_native_password\0".to_vec(),
        vec![0x85, 0xa6, 0xff, 0x01, 0, 0, 0, 1],
    ];
    let mut rng = Rng(0x5eed_0003);
    for _ in 0..ROUNDS / 2 {
        let seed = &seeds[rng.below(seeds.len())];
        let mut input = rng.mutate(seed);
        let _ = mysql::greeting_caps_offset(&input);
        let caps = mysql::caps_of(&input);
        mysql::set_caps(&mut input, caps ^ 0x800);
        if input.len() >= 4 {
            assert_eq!(mysql::caps_of(&input), caps ^ 0x800);
        }
    }
}
