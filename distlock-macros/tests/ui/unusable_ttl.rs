#[distlock::locked("job", ttl = "6ms")]
async fn job() -> Result<(), distlock::LockError> {
    Ok(())
}

fn main() {}
