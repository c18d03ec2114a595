//! placeholder
pub async fn run(_n: u32) -> anyhow::Result<()> {
    anyhow::bail!("demo arrives with the deploy issue")
}
