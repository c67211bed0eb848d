fn main() -> anyhow::Result<()> {
    let path = std::env::args().nth(2).unwrap_or_default();
    let config = portal::config::load_file(path)?;
    println!("{config:?}");
    Ok(())
}
