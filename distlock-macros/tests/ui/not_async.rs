#[distlock::locked("job")]
fn job() -> Result<(), distlock::LockError> {
    Ok(())
}

fn main() {}
