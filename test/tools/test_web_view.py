"""The browser view in a real headless Chromium: load the page, type a query, see the answer highlighted."""
import io
import shutil
import time

import numpy as np
import pytest


CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')
CHROMEDRIVER = shutil.which('chromedriver')


@pytest.fixture(scope='module')
def room_mapper():
    """A map of the built-in room (clean simulated features) with a label vocabulary."""
    from ov3d_ros.core.config import MapperConfig
    from ov3d_ros.core.features import create_extractor
    from ov3d_ros.core.mapper import Frame, Mapper
    from ov3d_ros.sim import CLASS_NAMES, builtin_scene, builtin_trajectory, default_camera, render
    cfg = MapperConfig()
    cfg.features.source, cfg.features.sim_preset, cfg.map.device = 'simulated', 'clean', 'cpu'
    cfg.labels.vocabulary = ['wall', 'floor', 'sofa', 'table', 'chair', 'bed']
    mapper = Mapper(cfg, create_extractor(cfg.features, 'cpu', CLASS_NAMES))
    scene, cam = builtin_scene(0), default_camera(160, 120)
    for i, T in enumerate(builtin_trajectory(scene, 12, 0)):
        f = render(scene, cam, T)
        mapper.integrate(Frame(f.rgb, f.depth_m, cam, T, float(i), f.semantic), force=True)
    return mapper


def _highlighted(png: bytes) -> int:
    """Pixels of the answer's highlight colour (magenta) in a screenshot."""
    from PIL import Image
    img = np.asarray(Image.open(io.BytesIO(png)).convert('RGB')).astype(int)
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    return int(((r > 200) & (g < 80) & (b > 200)).sum())


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                    reason='needs Debian chromium and chromium-driver (make setup installs them with apt-get)')
def test_query_in_a_headless_browser_highlights_the_answer(room_mapper, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from ov3d_ros.tools.web_view import MapWebView
    view = MapWebView(room_mapper, port=18080)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--window-size=1000,700',
              '--use-angle=swiftshader', '--enable-unsafe-swiftshader', '--ignore-gpu-blocklist'):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.get(view.url)
        wait = WebDriverWait(driver, 120, poll_frequency=0.5)
        label = wait.until(lambda d: d.find_element(By.XPATH, "//label[normalize-space()='Query']"))
        box = label.find_element(By.XPATH, "./ancestor::div[contains(@class, 'mantine-Flex-root')][1]//input")
        wait.until(lambda d: d.find_element(By.TAG_NAME, 'canvas'))
        time.sleep(5)                                             # the map's points arrive and render
        before = driver.get_screenshot_as_png()
        assert _highlighted(before) < 50                          # no answer yet: no highlight
        box.send_keys('sofa')
        wait.until(lambda d: view.answer is not None and view.answer.text == 'sofa')
        assert view.answer.voxels > 100 and view.answer.objects >= 1, view.answer
        wait.until(lambda d: 'sofa: ' in d.find_element(By.TAG_NAME, 'body').text)
        after = None
        end = time.monotonic() + 60
        while time.monotonic() < end:                             # until the highlighted points are drawn
            after = driver.get_screenshot_as_png()
            if _highlighted(after) > 1000:
                break
            time.sleep(1)
        (tmp_path / 'view.png').write_bytes(after)
        assert _highlighted(after) > 1000, f'no highlighted points in {tmp_path / "view.png"}'
        # the label colours and their legend
        toggle = driver.find_element(By.XPATH, "//label[normalize-space()='Label colours']")
        toggle.find_element(By.XPATH, "./ancestor::div[contains(@class, 'mantine-Flex-root')][1]//input").click()
        wait.until(lambda d: 'floor' in d.find_element(By.TAG_NAME, 'body').text)
        assert view.label_node.visible and not view.map_node.visible
    finally:
        driver.quit()
        view.close()
