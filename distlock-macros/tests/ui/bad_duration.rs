#[distlock::locked("job", ttl = "10 parsecs")]
async fn job() -> Result<(), distlock::LockError> {
    Ok(())
}

fn main() {}
