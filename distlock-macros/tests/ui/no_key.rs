#[distlock::locked(ttl = "5s")]
async fn job() -> Result<(), distlock::LockError> {
    Ok(())
}

fn main() {}
