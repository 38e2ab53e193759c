"""Fixtures shared by every test folder."""
import pytest


def map_builtin_room(vocabulary=(), device='cpu', compress_dim=0):
    """A Mapper of the built-in room: clean simulated features, 12 forced keyframes at 160x120, on ``device``,
    with ``vocabulary`` as its label volume (none when empty), features stored in ``compress_dim`` dims (0 =
    all)."""
    from ov3d_ros.core.config import MapperConfig
    from ov3d_ros.core.features import create_extractor
    from ov3d_ros.core.mapper import Frame, Mapper
    from ov3d_ros.sim import CLASS_NAMES, builtin_scene, builtin_trajectory, default_camera, render
    cfg = MapperConfig()
    cfg.features.source, cfg.features.sim_preset, cfg.map.device = 'simulated', 'clean', device
    cfg.labels.vocabulary, cfg.map.compress_dim = list(vocabulary), compress_dim
    mapper = Mapper(cfg, create_extractor(cfg.features, device, CLASS_NAMES))
    scene, cam = builtin_scene(0), default_camera(160, 120)
    for i, T in enumerate(builtin_trajectory(scene, 12, 0)):
        f = render(scene, cam, T)
        mapper.integrate(Frame(f.rgb, f.depth_m, cam, T, float(i), f.semantic), force=True)
    return mapper


@pytest.fixture(scope='session')
def room_mapper_factory():
    """:func:`map_builtin_room` (a fixture, so that any test folder can build the room map)."""
    return map_builtin_room


class Browser:
    """A headless Chromium (selenium, software WebGL through SwiftShader) showing a viser page."""

    def __init__(self, chromium: str, chromedriver: str):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.support.ui import WebDriverWait
        opts = webdriver.ChromeOptions()
        opts.binary_location = chromium
        for a in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--window-size=1000,700',
                  '--use-angle=swiftshader', '--enable-unsafe-swiftshader', '--ignore-gpu-blocklist'):
            opts.add_argument(a)
        self.driver = webdriver.Chrome(service=Service(chromedriver), options=opts)
        self.wait = WebDriverWait(self.driver, 120, poll_frequency=0.5)

    def open(self, url: str) -> None:
        """Load ``url`` and wait for the GUI panel and the 3D canvas."""
        from selenium.webdriver.common.by import By
        self.driver.get(url)
        self.wait.until(lambda d: d.find_element(By.XPATH, "//label[normalize-space()='Query']"))
        self.wait.until(lambda d: d.find_element(By.TAG_NAME, 'canvas'))

    def control(self, label: str):
        """The input element of the GUI control labelled ``label`` (text box, checkbox)."""
        from selenium.webdriver.common.by import By
        node = self.wait.until(lambda d: d.find_element(By.XPATH, f"//label[normalize-space()='{label}']"))
        return node.find_element(By.XPATH, "./ancestor::div[contains(@class, 'mantine-Flex-root')][1]//input")

    def text(self) -> str:
        """The page's visible text."""
        from selenium.webdriver.common.by import By
        return self.driver.find_element(By.TAG_NAME, 'body').text

    def close(self) -> None:
        self.driver.quit()


@pytest.fixture()
def browser():
    """A :class:`Browser`; the test is skipped where Debian's chromium and chromium-driver are not installed."""
    import shutil
    chromium = shutil.which('chromium') or shutil.which('chromium-browser')
    chromedriver = shutil.which('chromedriver')
    if not (chromium and chromedriver):
        pytest.skip('needs Debian chromium and chromium-driver (make setup installs them with apt-get)')
    b = Browser(chromium, chromedriver)
    try:
        yield b
    finally:
        b.close()
