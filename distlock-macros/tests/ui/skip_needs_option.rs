#[distlock::locked("job", on_busy = skip)]
async fn job() -> Result<(), distlock::LockError> {
    Ok(())
}

fn main() {}
