//! The checks and conversions of a configuration's text values (pure): CIDRs, DNS labels and
//! names, a probe string's escapes; and reading a text file of bounded size, for the
//! configuration and the files it names.
//!
//! May import: nothing outside `config`.

use std::path::Path;

use ipnet::IpNet;

/// A CIDR (`10.0.0.0/8`, `2001:db8::/32`) or a bare address (one host).
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    if let Ok(ip) = text.parse::<std::net::IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    Err(format!(
        "invalid CIDR {text:?}: expected an address and prefix length such as 10.0.0.0/8 or 2001:db8::/32"
    ))
}

/// A DNS label per RFC 1123: lowercase letters, digits and '-', 1 to 63 characters.
pub fn check_dns_label(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err(format!("{name:?} must be 1 to 63 characters (a DNS label)"));
    }
    if let Some((i, c)) = name
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(format!(
            "{name:?} has {c:?} at byte {i}; a DNS label has only lowercase letters, digits and '-'"
        ));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(format!(
            "{name:?} must start and end with a letter or digit (a DNS label)"
        ));
    }
    Ok(())
}

/// A DNS name: dot-separated labels, at most 253 characters.
pub fn check_dns_name(name: &str) -> Result<(), String> {
    if name.len() > 253 {
        return Err(format!("{name:?} is longer than 253 characters"));
    }
    for label in name.split('.') {
        check_dns_label(label).map_err(|m| format!("{name:?} is not a DNS name: {m}"))?;
    }
    Ok(())
}

/// Resolves `\r`, `\n`, `\t`, `\0`, `\\` and `\xNN` in a probe string.
pub fn unescape(text: &str) -> Result<Vec<u8>, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'\\' {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        let escape = bytes.get(i + 1).copied();
        match escape {
            Some(b'r') => out.push(b'\r'),
            Some(b'n') => out.push(b'\n'),
            Some(b't') => out.push(b'\t'),
            Some(b'0') => out.push(0),
            Some(b'\\') => out.push(b'\\'),
            Some(b'x') => {
                let hex = text
                    .get(i + 2..i + 4)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| {
                        format!("bad \\x escape at byte {i}: two hex digits expected")
                    })?;
                out.push(hex);
                i += 2;
            }
            Some(other) => return Err(format!("unknown escape \\{} at byte {i}", other as char)),
            None => return Err(format!("lone backslash at byte {i}")),
        }
        i += 2;
    }
    Ok(out)
}

/// Reads the text file at `path` if it holds at most `max` bytes of UTF-8; a larger file is
/// refused before it is read whole (`InvalidData`: "larger than N bytes"), a binary one names
/// the offset of its first invalid byte. For the configuration and the files it names.
pub fn read_limited(path: &Path, max: u64) -> std::io::Result<String> {
    use std::io::Read;
    let invalid = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(max + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(invalid(format!("larger than {max} bytes")));
    }
    String::from_utf8(bytes).map_err(|e| {
        invalid(format!(
            "not UTF-8 (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        ))
    })
}
