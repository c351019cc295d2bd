#[distlock::locked("job", ttl = "2ms")]
async fn job() -> Result<(), distlock::LockError> {
    Ok(())
}

fn main() {}
