"""The HTTP routes, by concern: `openai` (completions, models, route, feedback), `admin` (experts, routers,
jobs; admin token), `health` (health check and Prometheus metrics). Each module builds an APIRouter over a
`get_gateway` callable; the handlers stay thin and leave the work to the Gateway."""
