#[distlock::locked("job")]
async fn job() -> u32 {
    1
}

fn main() {}
